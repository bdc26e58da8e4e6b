"""`gpt2 serve`: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import copy
import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from gpt2cli.cli.options import (
    DEFAULT_MODEL,
    AdapterDir,
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
# serve's -m without the --model-name alias, which names the served id here (--served-name)
ServeModel = Annotated[str, typer.Option("--model", "-m", help=ModelRef.__metadata__[0].help)]


def serve(
    model: ServeModel = DEFAULT_MODEL,
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
        float,
        typer.Option(
            help="On SIGTERM / Ctrl-C, seconds in-flight requests may finish (a second signal "
            "ends them at once)."
        ),
    ] = 10.0,
    request_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a client has to send a whole request (headers and body), from "
            "connecting or from its previous response; then the connection is closed."
        ),
    ] = 30.0,
    keep_alive: Annotated[
        float, typer.Option(help="Seconds an idle connection is kept open after a response.")
    ] = 5.0,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes (413 above).")] = 1
    << 20,
    served_name: Annotated[
        str | None,
        typer.Option(
            "--served-name",
            "--model-name",
            help="The model id clients send and /v1/models lists (default: the model's file "
            "name). --model-name is its older spelling.",
        ),
    ] = None,
    prefill_chunk: Annotated[
        int, typer.Option(help="Prompt tokens read per step: the longest stall a prompt causes.")
    ] = 128,
    decode_chunk: Annotated[
        int, typer.Option(help="Tokens decoded per step (cancellation acts between steps).")
    ] = 4,
    prefix_cache_mb: Annotated[
        int,
        typer.Option(
            help="MiB of finished requests' KV cache kept, so a prompt starting with one reads "
            "only the rest (a chat turn: the new message); 0 keeps none."
        ),
    ] = 1024,
    warm_up: Annotated[
        WarmUp,
        typer.Option(
            help="What is compiled before /health answers 200: what a first request needs, then "
            "the rest in the background; 'first': the rest when a request needs it; 'all': "
            "everything (nothing compiles after start)."
        ),
    ] = "background",
    dtype: Dtype = "float32",
    adapter: AdapterDir = None,
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
      gpt2 serve -m gpt2-xl --adapter runs/xl-lora/adapter

      gpt2 serve -m out/final.npz --served-name my-gpt2

      curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "Once upon a time", "max_tokens": 20}'
    """
    origins = _check_flags(locals())
    check_steer_flags(steer, steer_layer, steer_scale)

    from gpt2cli.serve.listen import bind

    sock = bind(host, port)  # a port in use is said now, not after loading and compiling

    from gpt2cli import compile_cache
    from gpt2cli.cli.console import err
    from gpt2cli.engine import Engine
    from gpt2cli.hub import load_model, load_tokenizer
    from gpt2cli.progress import hub_progress_class
    from gpt2cli.serve.app import create_app
    from gpt2cli.serve.metrics import Metrics
    from gpt2cli.serve.programs import SlotPrograms
    from gpt2cli.serve.scheduler import Scheduler
    from gpt2cli.training import memory

    compile_cache.enable()
    with err.status(f"loading {model}"):
        config, params = load_model(model, tqdm_class=hub_progress_class(), adapter=adapter)
        tok = load_tokenizer(tokenizer, model, tqdm_class=hub_progress_class())
    if tok.vocab_size > config.vocab_size:
        raise UserError(
            f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary has "
            f"{config.vocab_size}; pass the model's tokenizer with --tokenizer"
        )
    window = config.n_positions
    need = memory.generation_footprint(
        config,
        rows=max_batch,
        length=window,
        prompt=window,
        compute_bytes=memory.compute_bytes(dtype),
        prefill_rows=1,  # a request's prompt is read alone
    )
    memory.check_fits(need, f"--max-batch {max_batch} x {window} tokens", "--max-batch")
    name = served_name or Path(model).name.removesuffix(".npz") or model
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
        prefix_cache_bytes=prefix_cache_mb << 20,
        warm_up=warm_up,
        on_ready=say_ready,
    )
    scheduler.metrics = Metrics(scheduler)
    app = create_app(
        scheduler, model_name=name, api_key=api_key, cors_origins=origins, max_body=max_body
    )
    timeouts = {"grace": grace, "request": request_timeout, "keep_alive": keep_alive}
    _run(app, scheduler, sock, host, port, timeouts, err)
    err.print("stopped")
    if scheduler.running:  # a compile still runs: exiting under it could crash the interpreter
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _check_flags(flags: dict) -> list[str] | None:
    """Values out of range are usage errors (exit 2), found before anything loads. -> the CORS
    origins."""
    for name in ("max_batch", "max_queue", "prefill_chunk", "decode_chunk", "max_body"):
        if flags[name] < 1:
            raise typer.BadParameter(
                f"must be at least 1, got {flags[name]}", param_hint=_flag(name)
            )
    if flags["prefix_cache_mb"] < 0:
        raise typer.BadParameter(
            f"must be 0 or more, got {flags['prefix_cache_mb']}", param_hint="--prefix-cache-mb"
        )
    if not 0 <= flags["port"] <= 65535:
        raise typer.BadParameter(
            f"must be from 0 to 65535, got {flags['port']}", param_hint="--port"
        )
    for name in ("grace", "queue_timeout", "keep_alive"):
        if not flags[name] >= 0:
            raise typer.BadParameter(
                f"must be 0 or more seconds, got {flags[name]}", param_hint=_flag(name)
            )
    if not flags["request_timeout"] > 0:
        raise typer.BadParameter(
            f"must be more than 0 seconds, got {flags['request_timeout']}",
            param_hint="--request-timeout",
        )
    if not flags["host"].strip():
        raise typer.BadParameter(
            "is empty (it would listen on every interface): give an address, e.g. 127.0.0.1 "
            "or 0.0.0.0",
            param_hint="--host",
        )
    key = flags["api_key"]
    if key is not None and not key.strip():
        raise typer.BadParameter(
            "is empty: give a key or leave the option out", param_hint="--api-key"
        )
    if key is not None and key != key.strip():
        raise typer.BadParameter(
            "starts or ends with white space, which no client's key can match (clients' keys "
            "are read without it)",
            param_hint="--api-key",
        )
    origins = flags["cors_origins"]
    return [o.strip() for o in origins.split(",") if o.strip()] if origins else None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _run(app, scheduler, sock, host: str, port: int, timeouts: dict, err) -> None:
    import uvicorn

    from gpt2cli.serve.listen import Server, timed_h11

    logging = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    logging["handlers"]["access"]["stream"] = "ext://sys.stderr"  # stdout is for results
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=timed_h11(timeouts["request"]),
        timeout_keep_alive=timeouts["keep_alive"],
        timeout_graceful_shutdown=None,  # the Server ends requests itself after the grace
        log_config=logging,
        lifespan="off",
    )
    # on a signal the scheduler compiles nothing more and never says "ready" after it
    server = Server(config, timeouts["grace"], app.state.server.shut_down, scheduler.begin_shutdown)
    scheduler.start()
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop(timeout=STOP_WAIT)
