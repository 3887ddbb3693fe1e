"""The FastAPI application: routes, OpenAI-shaped errors, API key, request limits."""

from __future__ import annotations

import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tucker_server.generation import RequestError
from tucker_server.metrics import Metrics
from tucker_server.protocol import error_body
from tucker_server.routes import APIError, router

log = logging.getLogger("tucker_server")
OPEN_PATHS = {"/health"}
MAX_BODY_BYTES = 4 * 2**20


def create_app(engine, metrics: Metrics, api_key: str | None = None, metrics_need_key: bool = False):
    """An ASGI app serving `engine` (an EngineClient); `api_key` protects every route but /health
    (and /metrics unless `metrics_need_key`)."""
    app = FastAPI(title="tucker-serve", version="0.1.0")
    app.state.engine, app.state.metrics, app.state.started = engine, metrics, int(time.time())
    app.include_router(router)
    open_paths = OPEN_PATHS | (set() if metrics_need_key else {"/metrics"})

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.url.path not in open_paths and not key_ok(request, api_key):
            return error(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                         code="invalid_api_key")
        if request.method == "POST" and not request.headers.get("content-type", "").startswith("application/json"):
            return error(415, "Content-Type must be application/json", code="unsupported_media_type")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error(400, "We could not parse the JSON body of your request.", code="invalid_json")
        if first.get("type") == "extra_forbidden":
            return error(400, f"Unrecognized request argument supplied: {'.'.join(loc)}", ".".join(loc) or None)
        return error(400, f"Invalid value for '{'.'.join(loc)}': {first.get('msg')}", ".".join(loc) or None,
                     code="invalid_value")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return error(400, str(exc), exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), type_="invalid_request_error")

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error(500, "The server had an error while processing your request.", type_="server_error")

    return BodyLimit(app, MAX_BODY_BYTES)


class BodyLimit:
    """ASGI wrapper: a request body over `limit` bytes is answered 413 before the app sees it,
    whether announced by Content-Length or streamed in chunks."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit
        self.state = app.state  # the FastAPI app's state, for callers holding the wrapper

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return await self.reject(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self.reject(send)
            if not message.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect like a normal request

        return await self.app(scope, replay, send)

    async def reject(self, send) -> None:
        payload = json.dumps(error_body(f"request body larger than {self.limit} bytes", code="request_too_large"))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload.encode()})


def key_ok(request: Request, api_key: str) -> bool:
    """Constant-time comparison of the bearer token with the configured key."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)
