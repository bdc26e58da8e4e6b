"""`gpt2 serve`: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from gpt2cli.cli.options import (
    DEFAULT_MODEL,
    Dtype,
    ModelRef,
    Steer,
    SteerLayer,
    SteerScale,
    TokenizerRef,
    check_steer_flags,
    steering,
)
from gpt2cli.errors import UserError

WarmUp = Literal["background", "first", "all"]  # what serve/warmup.py compiles before ready
STOP_WAIT = 3.0  # seconds the engine may take to end; a compile it is in is not waited for


def serve(
    model: ModelRef = DEFAULT_MODEL,
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[
        int, typer.Option(help="Requests decoded together (rows of KV cache).")
    ] = 8,
    max_queue: Annotated[
        int, typer.Option(help="Choices that may wait for a row; beyond it: 503 + Retry-After.")
    ] = 64,
    queue_timeout: Annotated[
        float, typer.Option(help="Seconds a choice may wait for a row before a 503.")
    ] = 60.0,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="GPT2_API_KEY", help="Require 'Authorization: Bearer KEY' (not on /health, /)."
        ),
    ] = None,
    cors_origins: Annotated[
        str | None,
        typer.Option(help="Comma-separated origins allowed by CORS, or '*' (default: CORS off)."),
    ] = None,
    grace: Annotated[
        float, typer.Option(help="On SIGTERM / Ctrl-C, seconds in-flight requests may finish.")
    ] = 10.0,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes (413 above).")] = 1
    << 20,
    model_name: Annotated[
        str | None, typer.Option(help="The model id clients send (default: the model's file name).")
    ] = None,
    prefill_chunk: Annotated[
        int, typer.Option(help="Prompt tokens read per step: the longest stall a prompt causes.")
    ] = 128,
    decode_chunk: Annotated[
        int, typer.Option(help="Tokens decoded per step (cancellation acts between steps).")
    ] = 4,
    warm_up: Annotated[
        WarmUp,
        typer.Option(
            help="What is compiled before /health answers 200: what a first request needs, then "
            "the rest in the background; 'first': the rest when a request needs it; 'all': "
            "everything (nothing compiles after start)."
        ),
    ] = "background",
    dtype: Dtype = "float32",
    tokenizer: TokenizerRef = None,
    steer: Steer = None,
    steer_layer: SteerLayer = None,
    steer_scale: SteerScale = None,
) -> None:
    """Serve a model over HTTP: the OpenAI API under /v1, a chat page at /.

    Requests are batched continuously: each takes a row of the KV cache when one is free and
    gives it back when it finishes, hits a stop string, or its client disconnects.

    Examples:

      gpt2 serve -m gpt2.npz

      gpt2 serve -m gpt2 --port 8080 --max-batch 16 --api-key "$KEY" --cors-origins http://localhost:3000

      curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "Once upon a time", "max_tokens": 20}'
    """
    for name, value in (
        ("--max-batch", max_batch),
        ("--max-queue", max_queue),
        ("--prefill-chunk", prefill_chunk),
        ("--decode-chunk", decode_chunk),
        ("--max-body", max_body),
    ):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {port}")
    for name, value in (("--grace", grace), ("--queue-timeout", queue_timeout)):
        if not value >= 0:
            raise UserError(f"{name} must be 0 or more seconds, got {value}")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty: give a key or leave the option out")
    origins = [o.strip() for o in cors_origins.split(",") if o.strip()] if cors_origins else None
    check_steer_flags(steer, steer_layer, steer_scale)

    from gpt2cli import compile_cache
    from gpt2cli.cli.console import err
    from gpt2cli.engine import Engine
    from gpt2cli.hub import load_model, load_tokenizer
    from gpt2cli.progress import hub_progress_class
    from gpt2cli.serve.app import create_app
    from gpt2cli.serve.metrics import Metrics
    from gpt2cli.serve.programs import SlotPrograms
    from gpt2cli.serve.scheduler import Scheduler

    compile_cache.enable()
    with err.status(f"loading {model}"):
        config, params = load_model(model, tqdm_class=hub_progress_class())
        tok = load_tokenizer(tokenizer, model, tqdm_class=hub_progress_class())
    if tok.vocab_size > config.vocab_size:
        raise UserError(
            f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary has "
            f"{config.vocab_size}; pass the model's tokenizer with --tokenizer"
        )
    name = model_name or Path(model).name.removesuffix(".npz") or model
    steers = steering(config, steer, steer_layer, steer_scale)
    engine = functools.partial(Engine, config, params, dtype, steering=steers)

    def load():
        one = engine(batch=1)
        many = engine(batch=max_batch) if max_batch > 1 else one
        what = f"every program for up to {max_batch} rows" if warm_up == "all" else "the first"
        err.print(f"compiling {what} (/health answers 503 until done)")
        return SlotPrograms(one, many, decode_chunk, prefill_chunk), tok

    def say_ready() -> None:
        if scheduler.load_error:
            err.print(f"[bold red]error:[/] the engine failed to start: {scheduler.load_error}")
        else:
            err.print("ready: /health answers 200")

    scheduler = Scheduler(
        load,
        max_batch=max_batch,
        max_queue=max_queue,
        queue_timeout=queue_timeout,
        warm_up=warm_up,
        on_ready=say_ready,
    )
    scheduler.metrics = Metrics(scheduler)
    app = create_app(
        scheduler, model_name=name, api_key=api_key, cors_origins=origins, max_body=max_body
    )
    ended = _run(app, scheduler, host, port, grace, err)
    err.print("stopped")
    if not ended:  # a compile still runs: exiting under it could crash the interpreter's exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _run(app, scheduler, host: str, port: int, grace: float, err) -> bool:
    """Serve until a signal; -> whether the engine's threads ended (see `Scheduler.stop`)."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM or Ctrl-C that shut it down cleanly exits 0
        (uvicorn re-raises the signal after its graceful shutdown)."""

        @contextlib.contextmanager
        def capture_signals(self):
            import signal

            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame) -> None:
            scheduler.begin_shutdown()  # no compile started, no "ready" printed after this
            super().handle_exit(sig, frame)

    logging = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    logging["handlers"]["access"]["stream"] = "ext://sys.stderr"  # stdout is for results
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=grace,
        log_config=logging,
        lifespan="off",
    )
    server = Server(config)
    scheduler.start()
    try:
        server.run()  # a port in use: uvicorn logs it and exits 1
    finally:
        ended = scheduler.stop(timeout=STOP_WAIT)
    return ended
