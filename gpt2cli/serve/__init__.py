"""`gpt2 serve`: an OpenAI-compatible HTTP server with continuous batching.

programs.py  the compiled programs over a block of slots (per-row lengths and sampling), each
             compiled once, from any thread
warmup.py    which programs are compiled before /health says ready, and the rest in the background
prefix_cache.py  finished requests' KV rows, kept in a byte-bounded LRU for prompts that extend them
scheduler.py the engine thread: queue, admission, chunked prefill, decode, cancellation
protocol.py  OpenAI request fields -> jobs, and responses / stream chunks back
app.py       the Starlette app: routes, auth, limits, streaming, metrics, the chat page
listen.py    uvicorn as serve runs it: bound first, request timeouts, shutdown in OpenAI's shape
"""
