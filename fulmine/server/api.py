"""The FastAPI app: routes, the chat page, auth, body limits, and every error in OpenAI's shape.

The engine's life (loading after the server starts listening, restarts, draining) and what
`/health` says of it are in lifecycle.py; API routes answer 503 with Retry-After unless it serves.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fulmine.config import ServerConfig
from fulmine.engine.llm_engine import LLMEngine
from fulmine.server import embeddings, messages, responses, tokens
from fulmine.server import protocol as p
from fulmine.server.async_engine import EngineDead
from fulmine.server.engine_client import EngineClient
from fulmine.server.lifecycle import ServerState
from fulmine.server.run import ClientDisconnected, until_disconnected

T = TypeVar("T")
logger = logging.getLogger("fulmine.server")
_OPEN_PATHS = ("/health", "/")  # and the chat page's assets under /static/
_STATIC = Path(__file__).parent / "static"
MAX_HEADER_BYTES = 32 * 1024  # all request headers together (431 past it)
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|\w+\[.*\]|function-\w+.*|tagged-union.*|[A-Z]\w*)$")


def _error(
    status: int,
    message: str,
    error_type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    path: str = "",
) -> JSONResponse:
    """An error in OpenAI's shape, or Anthropic's on its route (/v1/messages)."""
    if path.startswith("/v1/messages"):
        return JSONResponse(messages.error_body(status, message), status_code=status, headers=headers)
    return JSONResponse(p.error_body(message, error_type, param, code), status_code=status, headers=headers)


class _Guard:
    """Pure ASGI middleware (it leaves streaming and disconnect detection alone): bearer-token auth
    on every route but /health, a cap on header and body size, and a deadline for the body to
    arrive (a client that starts a body and never finishes it holds nothing for long). A refusal
    found while the app reads the body replaces whatever the app would answer: 413 or 408, in
    each API's error shape."""

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app, self.keys = app, set(config.api_key)
        self.max_body = int(config.max_body_mb * 2**20)
        self.body_timeout_s = config.body_timeout_s

    def _authorized(self, headers: dict[str, str]) -> bool:
        """A key in `Authorization: Bearer` (OpenAI's clients) or `x-api-key` (Anthropic's), compared
        in constant time against every configured key."""
        scheme, _, bearer = headers.get("authorization", "").partition(" ")
        offered = [bearer.strip()] if scheme.lower() == "bearer" else []
        if "x-api-key" in headers:
            offered.append(headers["x-api-key"].strip())
        found = False
        for token in offered:
            for key in self.keys:  # no early exit: the time does not depend on which key matched
                found |= hmac.compare_digest(token.encode(), key.encode())
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            await _error(431, f"request headers exceed {MAX_HEADER_BYTES // 1024} KB", "invalid_request_error",
                         code="headers_too_large", path=path)(scope, receive, send)  # fmt: skip
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        guarded = path not in _OPEN_PATHS and not path.startswith("/static/")
        if self.keys and guarded and not self._authorized(headers):
            response = _error(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                "invalid_request_error",
                code="invalid_api_key",
                path=path,
            )
            await response(scope, receive, send)
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            await self._too_large(path)(scope, receive, send)
            return
        received, body_done = 0, False
        started = False
        refusal: Response | None = None
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def guarded_receive() -> Message:
            nonlocal received, body_done, refusal
            if body_done or refusal is not None:
                return await receive()
            try:
                message = await _before(deadline, receive())
            except asyncio.TimeoutError:
                seconds = f"{self.body_timeout_s:g}"
                refusal = _error(408, f"the request body did not arrive within {seconds} s", "invalid_request_error",
                                 code="request_timeout", path=path)  # fmt: skip
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_body:
                    refusal = self._too_large(path)
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if refusal is not None and not started:
                return  # the app's answer to a body it never got whole: the refusal goes instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracked_send)
        except Exception:
            if refusal is None:
                raise
        if refusal is not None and not started:
            await refusal(scope, receive, send)

    def _too_large(self, path: str) -> Response:
        limit_mb = self.max_body / 2**20
        return _error(413, f"request body exceeds {limit_mb:g} MB", "invalid_request_error",
                      code="request_too_large", path=path)  # fmt: skip


async def _before(deadline: float, work: Awaitable[T]) -> T:
    """`work`'s result, or TimeoutError at `deadline` (the loop's clock). Python 3.11's timer cancels
    this task at the deadline; no task of its own per call, as wait_for makes."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout_at(deadline):
            return await work
    return await asyncio.wait_for(work, max(deadline - asyncio.get_running_loop().time(), 0.001))


class _InFlight:
    """Counts API requests until their response is fully sent (a stream's last event included), so
    a drain knows when the requests in flight are done."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


def create_app(
    config: ServerConfig,
    load_engine: Callable[[], LLMEngine | EngineClient],
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """`on_fatal(error)`: the model cannot be loaded, or the engine died too often; the caller
    should end the process (non-zero) so that a supervisor restarts it."""
    state = ServerState(config, load_engine, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        state.start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="fulmine", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.fulmine = state
    app.add_middleware(_InFlight, state=state)
    app.add_middleware(_Guard, config=config)
    _install_error_handlers(app)

    app.mount("/static", StaticFiles(directory=_STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        return FileResponse(_STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> Response:
        """200 {"status": "ok"} when serving; otherwise 503 with the state (see server/lifecycle.py).
        Behind replicas, also {"replicas": {"up", "total"}}; none up is a 503."""
        body: dict[str, Any] = {"status": "ok" if state.status == "ready" else state.status}
        replicas = state.engine.replicas() if state.engine is not None else None
        if replicas is not None:
            up, total = replicas
            body["replicas"] = {"up": up, "total": total}
            if not up and state.status == "ready":
                body["status"] = "no_replica_up"
        if body["status"] == "ok":
            return JSONResponse(body)
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        state.ready()
        return {"object": "list", "data": [_model_card(name, state.created) for name in state.model_names]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        state.ready().check_model(model)
        return _model_card(model, state.created)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Any:
        return await state.ready().chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request) -> Any:
        return await state.ready().completions(body, request)

    @app.post("/v1/embeddings")
    async def create_embeddings(body: embeddings.EmbeddingRequest, request: Request) -> Any:
        return await until_disconnected(request, embeddings.create(state.ready(), body))

    responses_api = responses.Responses()

    @app.post("/v1/responses")
    async def create_response(body: responses.ResponsesRequest, request: Request) -> Any:
        return await responses_api.create(state.ready(), body, request)

    @app.post("/v1/messages")
    async def anthropic_messages(body: messages.MessagesRequest, request: Request) -> Any:
        return await messages.create(state.ready(), body, request)

    @app.post("/tokenize")
    async def tokenize(body: tokens.TokenizeRequest) -> Any:
        return await tokens.tokenize(state.ready(), body)

    @app.post("/detokenize")
    async def detokenize(body: tokens.DetokenizeRequest) -> Any:
        return await tokens.detokenize(state.ready(), body)

    @app.post("/v1/messages/count_tokens")
    async def count_message_tokens(body: dict[str, Any]) -> Any:
        return await tokens.count_message_tokens(state.ready(), body)

    @app.post("/v1/responses/input_tokens")
    async def count_response_tokens(body: dict[str, Any]) -> Any:
        return await tokens.count_response_tokens(state.ready(), responses_api, body)

    @app.get("/props")
    async def get_props() -> Any:
        return tokens.props(state.ready())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "fulmine"}


def _install_error_handlers(app: FastAPI) -> None:
    async def request_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, p.RequestError)
        headers = {"Retry-After": str(error.retry_after_s)} if error.status in (429, 503) else None
        return _error(error.status, error.message, error.error_type, error.param, error.code, headers, request.url.path)

    async def validation_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        first = error.errors()[0] if error.errors() else {}
        # pydantic names the union member that failed (e.g. "str", "list[int]"): not a field
        loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _TYPE_TAG.match(str(part))]
        param = ".".join(loc) or None
        kind = first.get("type", "")
        if kind == "json_invalid" or (kind == "missing" and not loc):
            message = "We could not parse the JSON body of your request: send a JSON object."
            param = None
        elif kind == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        else:
            message = f"Invalid value for {param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg"))
        return _error(400, message, "invalid_request_error", param, kind or None, path=request.url.path)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        message = {
            404: f"unknown route {request.method} {request.url.path}",
            405: f"method {request.method} is not allowed on {request.url.path}",
        }.get(error.status_code, str(error.detail))
        if isinstance(error.__cause__, RecursionError):  # the JSON parser's own depth limit (~1000)
            message = "the JSON body is nested too deeply"
        return _error(error.status_code, message, "invalid_request_error", path=request.url.path)

    async def engine_dead(request: Request, error: Exception) -> Response:
        return _error(
            503,
            f"the engine failed ({error}); it is restarting, retry shortly",
            "service_unavailable",
            code="engine_restarting",
            headers={"Retry-After": "1"},
            path=request.url.path,
        )

    async def client_left(request: Request, error: Exception) -> Response:
        logger.info("%s: the client left before its answer was ready; its work was aborted", request.url.path)
        return Response(status_code=499)

    async def unexpected(request: Request, error: Exception) -> Response:
        logger.exception("unexpected error on %s", request.url.path)
        return _error(500, "internal server error", "server_error", path=request.url.path)

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        p.RequestError: request_error,
        RequestValidationError: validation_error,
        StarletteHTTPException: http_error,
        EngineDead: engine_dead,
        ClientDisconnected: client_left,
        Exception: unexpected,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
