"""ASGI middleware for vLLM's server (`--middleware tucker_server.middleware.TuckerMiddleware`).

What vLLM's own server lacks, configured from serve's declared options (`ServeOptions`, read from
their TUCKER_* variables: vLLM builds middleware with no arguments):
- an API key on every path but /health and /metrics (/metrics too with --metrics-need-key); vLLM's
  --api-key guards /v1 only. A blank key refuses to start: it must never mean "no key";
- request bodies bounded: over --max-body-bytes on keyed paths, and over OPEN_PATH_BODY_BYTES on the
  paths anyone may call, get 413 before vLLM parses them, announced or streamed in chunks;
- a malformed Content-Length gets 400, and so does a body that is not UTF-8 unless it says it is not
  JSON (a missing content type counts as JSON: FastAPI parses it as such);
- more than MAX_HEADER_COUNT headers or MAX_HEADER_BYTES of them get 431 (uvicorn's own bound
  depends on which HTTP parser it picked).
Errors use vLLM's (OpenAI's) error shape: FastAPI's `{"detail": ...}` is unreadable to OpenAI clients.
"""

from __future__ import annotations

import argparse
import json
import re

from starlette.datastructures import Headers
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

from tucker_server.launcher import env_name, options_from

OPEN_PATHS = ("/health", "/metrics")
OPEN_PATH_BODY_BYTES = 4096  # /health and /metrics take no body; anyone may call them
MAX_HEADER_COUNT = 128
MAX_HEADER_BYTES = 64 * 2**10
BODY_METHODS = ("POST", "PUT", "PATCH")
DIGITS = re.compile(rb"[0-9]{1,18}")  # ASCII only: str.isdigit() accepts "²", which int() refuses


def error_response(status: int, message: str, type_: str) -> tuple[dict, bytes]:
    body = {"error": {"message": message, "type": type_, "param": None, "code": status}}
    start = {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
    return start, json.dumps(body).encode()


def utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def declared_length(raw_headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body size a request announces; ValueError when Content-Length is malformed or ambiguous."""
    values = {v.strip() for k, v in raw_headers if k.lower() == b"content-length"}
    if not values:
        return None
    if len(values) > 1 or not DIGITS.fullmatch(next(iter(values))):
        raise ValueError(values)
    return int(next(iter(values)))


class TuckerMiddleware:
    def __init__(self, app) -> None:
        self.app = app
        opt = options_from(argparse.Namespace())
        if opt.api_key is not None and not opt.api_key.strip():
            raise ValueError(f"{env_name('api_key')} is empty: set a key, or unset it to serve without one")
        self.auth = AuthenticationMiddleware(app, tokens=[opt.api_key]) if opt.api_key else None
        self.open_paths = set(OPEN_PATHS) - ({"/metrics"} if opt.metrics_need_key else set())
        self.limit = opt.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        raw = scope["headers"]
        if len(raw) > MAX_HEADER_COUNT or sum(len(k) + len(v) for k, v in raw) > MAX_HEADER_BYTES:
            return await self.refuse(scope, send, 431, f"Request headers exceed {MAX_HEADER_COUNT} fields or "
                                                       f"{MAX_HEADER_BYTES} bytes.", "BadRequestError")
        open_path = self.path(scope) in self.open_paths
        if self.auth is not None and not open_path and scope.get("method") != "OPTIONS" \
                and not self.auth.verify_token(Headers(scope=scope)):
            return await self.refuse(scope, send, 401, "Incorrect API key provided. Pass it as "
                                                       "'Authorization: Bearer <key>'.", "AuthenticationError")
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        try:
            declared = declared_length(raw)
        except ValueError:
            return await self.reject(send, 400, "Malformed Content-Length header.", "BadRequestError")
        chunked = any(k.lower() == b"transfer-encoding" for k, _ in raw)
        if scope["method"] in BODY_METHODS or chunked or declared:
            limit = OPEN_PATH_BODY_BYTES if open_path else self.limit
            return await self.limited(scope, receive, send, declared, limit)
        return await self.app(scope, receive, send)

    @staticmethod
    def path(scope) -> str:
        return scope["path"].removeprefix(scope.get("root_path", "")).rstrip("/") or "/"

    async def limited(self, scope, receive, send, declared: int | None, limit: int):
        """Read the body up to the limit, then hand it to the app as one message."""
        if declared is not None and declared > limit:
            return await self.too_large(send, limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self.too_large(send, limit)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False
        content_type = Headers(scope=scope).get("content-type")
        if (content_type is None or "json" in content_type.lower()) and not utf8(body):
            return await self.reject(send, 400, "The request body is not valid UTF-8.", "BadRequestError")

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect like a normal request

        return await self.app(scope, replay, send)

    async def too_large(self, send, limit: int):
        return await self.reject(send, 413, f"Request body larger than {limit} bytes.", "BadRequestError")

    async def refuse(self, scope, send, status: int, message: str, type_: str):
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})  # policy violation
        return await self.reject(send, status, message, type_)

    async def reject(self, send, status: int, message: str, type_: str):
        start, body = error_response(status, message, type_)
        await send(start)
        await send({"type": "http.response.body", "body": body})
