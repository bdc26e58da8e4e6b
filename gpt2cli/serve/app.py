"""The Starlette app: OpenAI's routes over a `Scheduler`, streaming as server-sent events.

A request becomes one job per choice (see protocol.py); its events come back from the engine
thread into an asyncio queue. While a response is being produced the client connection is
watched, and a disconnect cancels the request's jobs, streamed or not.

The event loop only moves bytes: parsing a body, tokenizing it and encoding a large answer run
in a worker thread, so a 1 MiB prompt never stalls the streams of others. `Server.shut_down`
ends every request still running in OpenAI's shape (a 503, or an error event and [DONE]).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from html import escape
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gpt2cli.serve import protocol
from gpt2cli.serve.metrics import Metrics
from gpt2cli.serve.protocol import APIError, Plan
from gpt2cli.serve.scheduler import Delta, Failed, Finish, Job, Prompt, QueueFull, Scheduler
from gpt2cli.tokenizer import token_bytes

RETRY_AFTER_S = 1
CLIENT_GONE = 499  # nginx's status for a client that closed its connection first
log = logging.getLogger("uvicorn.error")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", None, "shutting_down")


class Run:
    """One request's jobs and the queue their events arrive on."""

    def __init__(self, plan: Plan, scheduler: Scheduler, live: set):
        self.plan = plan
        self.scheduler = scheduler
        self.live = live  # the server's running requests, for `Server.shut_down`
        self.error: APIError | None = None  # why the server ended it (`abort`)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started = time.monotonic()
        loop = asyncio.get_running_loop()
        self.jobs = []
        for p, ids in enumerate(plan.prompts):
            for j in range(plan.n):
                index = p * plan.n + j

                def sink(event, index=index):
                    with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens
                        loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

                job = Job(
                    prompt=ids,
                    max_tokens=plan.max_tokens[p],
                    settings=plan.settings,
                    sample=j,
                    stop=plan.stop,
                    sink=sink,
                    score_prompt=plan.score_prompts,
                )
                self.jobs.append(job)
        self.open = len(self.jobs)
        self.cancelled = False

    def start(self) -> None:
        try:
            self.scheduler.submit(self.jobs)
        except QueueFull as exc:
            raise APIError(503, str(exc), None, "queue_full") from None
        self.live.add(self)

    def cancel(self) -> None:
        """The client left: stop the jobs (counted as cancelled)."""
        if self._stop() and self.scheduler.metrics:
            self.scheduler.metrics.cancelled.inc()

    def abort(self, error: APIError) -> None:
        """The server ends the request: `events` raises `error`."""
        self.error = error
        self._stop()

    def close(self) -> None:
        """The response is over, however it ended."""
        self.cancel()
        self.live.discard(self)

    def _stop(self) -> bool:
        if not self.open or self.cancelled:
            return False
        self.cancelled = True
        self.scheduler.cancel(self.jobs)
        self.queue.put_nowait((None, None))  # wake whoever waits for events
        return True

    async def events(self):
        """(choice index, event) until every choice has finished (or the run is cancelled)."""
        while self.open:
            index, event = await self.queue.get()
            if index is None:
                if self.error is not None:
                    raise self.error
                return
            if isinstance(event, Finish | Failed):
                self.open -= 1
            yield index, event


async def watch_disconnect(receive, run: Run) -> None:
    """Cancel the run when the client goes away (the body has been read by now)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            run.cancel()
            return


class EventStream:
    """An ASGI response sending server-sent events; cancels its run if the client leaves."""

    def __init__(self, run: Run, chunks):
        self.run = run
        self.chunks = chunks

    async def __call__(self, scope, receive, send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        watcher = asyncio.create_task(watch_disconnect(receive, self.run))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for chunk in self.chunks:
                data = chunk if isinstance(chunk, str) else json.dumps(chunk, ensure_ascii=False)
                body = f"data: {data}\n\n".encode()
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client left while we were sending
            pass
        finally:
            watcher.cancel()
            self.run.close()


class Server:
    """What the routes share: the scheduler, the tokenizer, the served model's name."""

    def __init__(self, scheduler: Scheduler, model_name: str, api_key: str | None):
        self.scheduler = scheduler
        self.model_name = model_name
        self.api_key = None if api_key is None else api_key.encode()
        self.metrics = scheduler.metrics
        self.created = int(time.time())
        self.runs: set[Run] = set()
        self.closing = False

    def shut_down(self) -> None:
        """End every running request now, in OpenAI's shape, and refuse new ones (the server's
        grace period is over). Call it on the event loop."""
        self.closing = True
        for run in list(self.runs):
            run.abort(shutting_down())

    # ---- shared checks ---------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # bytes, as the client sent them (HTTP headers arrive as latin-1): a key or token
        # outside ASCII compares like any other
        token = token.strip().encode("latin-1")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token, self.api_key):
            raise APIError(
                401,
                "missing or wrong API key: send Authorization: Bearer KEY",
                None,
                "invalid_api_key",
            )

    def require_ready(self) -> None:
        s = self.scheduler
        if s.load_error:
            raise APIError(
                503, f"the model failed to load: {s.load_error}", None, "model_not_loaded"
            )
        if not s.ready.is_set():
            raise APIError(503, "the model is still loading; retry shortly", None, "model_loading")

    async def read_json(self, request: Request):
        limit = request.app.state.max_body
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(
                413,
                f"the request body is over the limit of {limit} bytes",
                None,
                "request_too_large",
            )
        body = bytearray()
        async for part in request.stream():  # ClientDisconnect if the client leaves: a 499
            body += part
            if len(body) > limit:
                raise APIError(
                    413,
                    f"the request body is over the limit of {limit} bytes",
                    None,
                    "request_too_large",
                )
        return await run_in_threadpool(protocol.parse_body, bytes(body))

    # ---- routes ----------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        s = self.scheduler
        if s.load_error:
            return JSONResponse({"status": "error", "message": s.load_error}, 503)
        if not s.ready.is_set():
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        self.authorize(request)
        name = request.path_params["model"]
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        return JSONResponse(self.model_card())

    def model_card(self) -> dict:
        programs = self.scheduler.programs
        n_positions = None if programs is None else programs.config.n_positions
        return protocol.model_card(self.model_name, self.created, n_positions)

    async def metrics_text(self, request: Request) -> Response:
        self.authorize(request)
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def tokenize(self, request: Request) -> Response:
        self.authorize(request)
        body = await self.read_json(request)
        self.require_ready()
        n_positions = self.scheduler.programs.config.n_positions

        def answer() -> Response:
            tokens = protocol.tokenize(
                body, self.scheduler.tokenizer, n_positions, self.model_names
            )
            return JSONResponse(tokens)

        return await run_in_threadpool(answer)

    async def tokenizer_info(self, request: Request) -> Response:
        self.authorize(request)
        self.require_ready()
        n_positions = self.scheduler.programs.config.n_positions
        return JSONResponse(protocol.tokenizer_info(self.scheduler.tokenizer, n_positions))

    async def detokenize(self, request: Request) -> Response:
        self.authorize(request)
        body = await self.read_json(request)
        self.require_ready()
        vocab = self.scheduler.programs.config.vocab_size

        def answer() -> Response:
            text = protocol.detokenize(body, self.scheduler.tokenizer, vocab, self.model_names)
            return JSONResponse(text)

        return await run_in_threadpool(answer)

    @property
    def model_names(self) -> set[str]:
        return {self.model_name}

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self.generate(request, chat=True)

    async def generate(self, request: Request, chat: bool) -> Response:
        self.authorize(request)
        body = await self.read_json(request)
        self.require_ready()
        make = protocol.chat_plan if chat else protocol.completion_plan
        plan = await run_in_threadpool(
            make,
            body,
            models=self.model_names,
            tokenizer=self.scheduler.tokenizer,
            config=self.scheduler.programs.config,
            max_batch=self.scheduler.max_batch,
        )
        if self.closing:
            raise shutting_down()
        run = Run(plan, self.scheduler, self.runs)
        run.start()
        if plan.stream:
            return EventStream(run, self.stream_chunks(run))
        return await self.complete(request, run)

    # ---- answers -----------------------------------------------------------------------

    def bodies(self, plan: Plan) -> protocol.Bodies:
        return protocol.Bodies(plan, token_bytes(self.scheduler.tokenizer))

    async def complete(self, request: Request, run: Run) -> Response:
        bodies = self.bodies(run.plan)
        watcher = asyncio.create_task(watch_disconnect(request.receive, run))
        try:
            async for index, event in run.events():
                if isinstance(event, Failed):
                    run.cancel()
                    raise APIError(event.status, event.message)
                if isinstance(event, Prompt):
                    bodies.prompt(index, event.tokens)
                elif isinstance(event, Delta):
                    bodies.add(index, event.text, event.tokens)
                else:
                    bodies.finish(index, event.reason, event.completion_tokens)
        finally:
            watcher.cancel()
            run.close()
        if run.cancelled:  # the client is gone: nobody reads this
            return Response(status_code=CLIENT_GONE)
        self.served(run)
        return await run_in_threadpool(lambda: JSONResponse(bodies.whole()))

    def served(self, run: Run) -> None:
        self.metrics.duration.observe(time.monotonic() - run.started)
        self.metrics.prompt_tokens.inc(sum(map(len, run.plan.prompts)))

    async def stream_chunks(self, run: Run):
        bodies = self.bodies(run.plan)
        for chunk in bodies.opening():
            yield chunk
        async for index, event in guarded(run.events()):
            if isinstance(event, Failed):
                event = APIError(event.status, event.message)
            if isinstance(event, APIError):  # the engine failed it, or the server ended it
                yield {"error": event.body()["error"]}
                run.cancel()
                break
            if isinstance(event, Finish):
                yield bodies.finish(index, event.reason, event.completion_tokens)
                continue
            if isinstance(event, Prompt):
                yield bodies.prompt(index, event.tokens)
                continue
            chunk = bodies.delta(index, event.text, event.tokens)
            if chunk is not None:
                yield chunk
        else:
            self.served(run)
            usage = bodies.usage_chunk()
            if usage is not None:
                yield usage
        yield "[DONE]"

    async def page(self, request: Request) -> Response:
        html = resources.files("gpt2cli.serve").joinpath("static/chat.html").read_text("utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", escape(self.model_name)))


async def guarded(events):
    """The events, then the APIError that ended them (as an event) if one did."""
    try:
        async for item in events:
            yield item
    except APIError as exc:
        yield None, exc


def error_response(exc: APIError) -> Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
    return JSONResponse(exc.body(), exc.status, headers=headers)


def internal_error(exc: Exception) -> Response:
    message = f"internal error: {type(exc).__name__}: {exc}"
    return error_response(APIError(500, message, None, "internal_error"))


def create_app(
    scheduler: Scheduler,
    *,
    model_name: str,
    api_key: str | None = None,
    cors_origins: list[str] | None = None,
    max_body: int = 1 << 20,
) -> Starlette:
    if scheduler.metrics is None:
        scheduler.metrics = Metrics(scheduler)
    server = Server(scheduler, model_name, api_key)

    def counted(endpoint: str, handler):
        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except APIError as exc:
                response = error_response(exc)
            except ClientDisconnect:  # it left while sending its body: nobody reads this
                response = Response(status_code=CLIENT_GONE)
            except Exception as exc:  # noqa: BLE001 - one request fails, the server goes on
                log.exception("internal error on %s", endpoint)
                response = internal_error(exc)
            status = getattr(response, "status_code", 200)
            server.metrics.requests.inc(endpoint=endpoint, status=str(status))
            return response

        return route

    routes = [
        Route("/", server.page, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", counted("/metrics", server.metrics_text), methods=["GET"]),
        Route("/v1/models", counted("/v1/models", server.models), methods=["GET"]),
        Route("/v1/models/{model:path}", counted("/v1/models", server.model), methods=["GET"]),
        Route("/v1/completions", counted("/v1/completions", server.completions), methods=["POST"]),
        Route(
            "/v1/chat/completions",
            counted("/v1/chat/completions", server.chat_completions),
            methods=["POST"],
        ),
        Route("/tokenize", counted("/tokenize", server.tokenize), methods=["POST"]),
        Route(
            "/tokenizer_info",
            counted("/tokenizer_info", server.tokenizer_info),
            methods=["GET"],
        ),
        Route("/detokenize", counted("/detokenize", server.detokenize), methods=["POST"]),
    ]

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {
            404: f"no route {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }
        return error_response(
            APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)))
        )

    async def unexpected(request: Request, exc: Exception) -> Response:
        return internal_error(exc)

    middleware = []
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=cors_origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                # any header, for an allowed origin: OpenAI's JavaScript SDK adds its own
                # (x-stainless-*, openai-beta, openai-organization, ...) to every request
                allow_headers=["*"],
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: http_error, Exception: unexpected},
    )
    app.state.max_body = max_body
    app.state.server = server
    return app
