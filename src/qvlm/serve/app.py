"""The HTTP server: an OpenAI-compatible chat-completions API and one web page, on FastAPI + uvicorn.

Routes: ``POST /v1/chat/completions`` (JSON or server-sent events), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health`` and ``GET /`` (the page in ``static/index.html``, which
calls the same API). Every error, including unknown routes and bad methods, is OpenAI's error JSON
with a 4xx status; only a server fault is a 5xx. The API key, when set, is checked on every
``/v1`` route; ``/`` and ``/health`` are open (they reveal nothing but the model name and queue size).

Admission: a request holds a slot from the moment its body starts to arrive until its answer is
sent or its client leaves; with ``max_batch_size + max_queue`` slots taken, new requests get 429
before their body is read. A client that disconnects frees its slot at once and its generation
stops at the next step (``Batcher.cancel``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import sys
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from qvlm.serve.batcher import Batcher, Job, QueueFull
from qvlm.serve.engine import Engine, Work, sampling_key
from qvlm.serve.schemas import (APIError, bad, chunk, completion, completion_id, error_body, model_card,
                                parse_chat_request, usage)

API_KEY_ENV = "QVLM_API_KEY"
PREPARE_CONCURRENCY = 4  # requests decoding images / tokenising at once (CPU work off the event loop)
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


class Admission:
    """Counts requests in flight; refuses (429) beyond ``capacity``."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_flight = 0

    def acquire(self) -> None:
        if self.in_flight >= self.capacity:
            raise queue_full(f"{self.in_flight} requests are in flight (capacity {self.capacity})")
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


def queue_full(detail: str) -> APIError:
    return APIError(429, f"the server is busy: {detail}; retry shortly", type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": "1"})


def page_html() -> str:
    return resources.files("qvlm.serve").joinpath("static/index.html").read_text(encoding="utf-8")


# ---- request helpers -------------------------------------------------------------------------

def check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if not header:
        raise APIError(401, "no API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError(401, "incorrect API key", code="invalid_api_key")


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limit: int) -> object:
    """The request body as JSON: 413 past ``limit`` bytes (declared or streamed), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad("Content-Length must be a number")
        if int(declared) > limit:
            raise body_too_large(int(declared), limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise body_too_large(len(body), limit)
    if not body:
        raise bad("the request body is empty; send a JSON object")
    try:
        return json.loads(body, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc


def body_too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is over this server's limit of {limit} bytes (got {size}+)",
                    code="request_too_large")


async def wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (after the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def job_events(request: Request, job: Job) -> AsyncIterator[tuple[str, dict]]:
    """The job's events until "done" or "error"; ``ClientGone`` if the client leaves first."""
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        while True:
            if job.events.empty():
                nxt = asyncio.ensure_future(job.events.get())
                await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    raise ClientGone()
                kind, data = nxt.result()
            else:
                kind, data = job.events.get_nowait()
            yield kind, data
            if kind in ("done", "error"):
                return
    finally:
        gone.cancel()


def sse(obj: object) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class JobStreamResponse(StreamingResponse):
    """A streaming response that runs ``on_close`` however the stream ends (done, error, client gone)."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


# ---- the app ---------------------------------------------------------------------------------

def create_app(engine: Engine, api_key: str | None = None, batcher: Batcher | None = None) -> FastAPI:
    """The ASGI app serving ``engine``; ``batcher`` defaults to one running ``engine.run_batch``."""
    limits = engine.limits
    batcher = batcher or Batcher(engine.run_batch, limits.max_batch_size, limits.max_queue)
    admission = Admission(limits.max_batch_size + limits.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="qvlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.batcher, app.state.admission = engine, batcher, admission
    add_error_handlers(app)
    add_info_routes(app, engine, batcher, admission, api_key)
    add_chat_route(app, engine, batcher, admission, api_key)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI-style JSON body."""

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (f"unknown route: {request.method} {request.url.path}" if exc.status_code == 404
                   else f"{exc.detail}: {request.method} {request.url.path}")
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(message, code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(f"invalid request: {exc.errors()}"), status_code=400)

    @app.exception_handler(Exception)
    async def on_server_error(request: Request, exc: Exception) -> JSONResponse:
        print(f"qvlm serve: internal error on {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}", type="server_error"),
                            status_code=500)


def unknown_model(engine: Engine, name: str) -> APIError:
    return APIError(404, f"the model '{name}' does not exist; this server has '{engine.model_id}'",
                    param="model", code="model_not_found")


def add_info_routes(app: FastAPI, engine: Engine, batcher: Batcher, admission: Admission,
                    api_key: str | None) -> None:
    """The web page, /health and the model list."""

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html(), headers={"Content-Security-Policy": PAGE_CSP,
                                                  "X-Content-Type-Options": "nosniff"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.model_id, "in_flight": admission.in_flight,
                "queue": batcher.snapshot()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request, api_key)
        return {"object": "list", "data": [model_card(engine.model_id, engine.created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        check_key(request, api_key)
        if model_id != engine.model_id:
            raise unknown_model(engine, model_id)
        return model_card(engine.model_id, engine.created)


def add_chat_route(app: FastAPI, engine: Engine, batcher: Batcher, admission: Admission,
                   api_key: str | None) -> None:
    """POST /v1/chat/completions: admitted, parsed, prepared off the event loop, then batched."""
    limits = engine.limits
    preparing = asyncio.Semaphore(PREPARE_CONCURRENCY)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request, api_key)
        admission.acquire()
        handed_off = False
        try:
            body = await read_json(request, limits.max_body_bytes)
            req = parse_chat_request(body, limits)
            if req.model is not None and req.model != engine.model_id:
                raise unknown_model(engine, req.model)
            async with preparing:
                prepared = await run_in_threadpool(engine.prepare, req)
            job = Job(key=sampling_key(req), payload=Work(req, prepared), loop=asyncio.get_running_loop())
            try:
                batcher.submit(job)
            except QueueFull as exc:
                raise queue_full(str(exc)) from exc
            if req.stream:
                handed_off = True
                return stream_response(request, job, req.include_usage, engine.model_id, batcher, admission)
            return await complete(request, job, engine.model_id, batcher)
        finally:
            if not handed_off:
                admission.release()


def stream_response(request: Request, job: Job, include_usage: bool, name: str, batcher: Batcher,
                    admission: Admission) -> Response:
    """Server-sent events of ``job``; the admission slot is given back when the stream closes."""
    def close() -> None:
        if not job.done:
            batcher.cancel(job)
        admission.release()

    return JobStreamResponse(stream_chunks(request, job, include_usage, completion_id(), name), close,
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def complete(request: Request, job: Job, name: str, batcher: Batcher) -> Response:
    """The whole answer of ``job`` as one chat.completion."""
    cid = completion_id()
    try:
        async for kind, data in job_events(request, job):
            if kind == "error":
                raise APIError(data.get("status", 500), data["message"], type="server_error")
            if kind == "done":
                return JSONResponse(completion(cid, name, data["text"], data["finish_reason"],
                                               data["prompt_tokens"], data["completion_tokens"]))
    except ClientGone:
        batcher.cancel(job)
        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
    raise APIError(500, "generation ended without an answer", type="server_error")


async def stream_chunks(request: Request, job: Job, include_usage: bool, cid: str, name: str) -> AsyncIterator[str]:
    created = int(time.time())
    yield sse(chunk(cid, name, created, {"role": "assistant", "content": ""}))
    try:
        async for kind, data in job_events(request, job):
            if kind == "delta":
                yield sse(chunk(cid, name, created, {"content": data["text"]}))
            elif kind == "error":
                yield sse(error_body(data["message"], type="server_error"))
                return
            else:
                yield sse(chunk(cid, name, created, {}, finish_reason=data["finish_reason"]))
                if include_usage:
                    yield sse(chunk(cid, name, created, usage_=usage(data["prompt_tokens"],
                                                                      data["completion_tokens"])))
    except ClientGone:
        return
    yield "data: [DONE]\n\n"


# ---- running it ------------------------------------------------------------------------------

def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(app: FastAPI, log_level: str = "warning"):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("debug", "info"),
                            timeout_graceful_shutdown=5, lifespan="on")
    return uvicorn.Server(config)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          announce: Callable[[str], None] | None = None) -> None:
    """Run until interrupted; ``announce`` gets the URL once the socket is bound."""
    sock = bind(host, port)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{sock.getsockname()[1]}"
    if announce is not None:
        announce(url)
    make_server(app, log_level).run(sockets=[sock])
