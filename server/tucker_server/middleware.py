"""ASGI middleware for vLLM's server (`--middleware tucker_server.middleware.TuckerMiddleware`).

What vLLM's own server lacks, configured from the environment (vLLM builds middleware with no
arguments; `tucker-serve serve` sets these from its options):
- TUCKER_API_KEY: the key on every path but /health (vLLM's --api-key guards /v1 only), and /metrics
  too when TUCKER_METRICS_NEED_KEY=1; compared in constant time by vLLM's own check;
- TUCKER_MAX_BODY_BYTES (default 4 MiB): larger request bodies get 413, whether announced by
  Content-Length or streamed in chunks, before vLLM parses them;
- a JSON body that is not UTF-8 gets 400 in OpenAI's error shape (FastAPI would answer
  `{"detail": ...}`, which OpenAI clients cannot read).
Errors use vLLM's (OpenAI's) error shape.
"""

from __future__ import annotations

import json
import os

from starlette.datastructures import Headers
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
TRUE = ("1", "true", "yes")


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


class TuckerMiddleware:
    def __init__(self, app) -> None:
        self.app = app
        key = os.environ.get("TUCKER_API_KEY") or None
        self.auth = AuthenticationMiddleware(app, tokens=[key]) if key else None
        self.open_paths = {"/health"} | (set() if os.environ.get("TUCKER_METRICS_NEED_KEY", "").lower() in TRUE
                                         else {"/metrics"})
        self.limit = int(os.environ.get("TUCKER_MAX_BODY_BYTES") or DEFAULT_MAX_BODY_BYTES)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if self.needs_key(scope) and not self.auth.verify_token(Headers(scope=scope)):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})  # policy violation
            return await self.reject(send, 401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                                     "AuthenticationError")
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            return await self.limited(scope, receive, send)
        return await self.app(scope, receive, send)

    def needs_key(self, scope) -> bool:
        path = scope["path"].removeprefix(scope.get("root_path", "")).rstrip("/") or "/"
        return self.auth is not None and scope.get("method") != "OPTIONS" and path not in self.open_paths

    async def limited(self, scope, receive, send):
        """Read the body up to the limit, then hand it to the app as one message."""
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self.too_large(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self.too_large(send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False
        if "json" in Headers(scope=scope).get("content-type", "") and not utf8(body):
            return await self.reject(send, 400, "The request body is not valid UTF-8.", "BadRequestError")

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect like a normal request

        return await self.app(scope, replay, send)

    async def too_large(self, send):
        return await self.reject(send, 413, f"Request body larger than {self.limit} bytes.", "BadRequestError")

    async def reject(self, send, status: int, message: str, type_: str):
        start, body = error_response(status, message, type_)
        await send(start)
        await send({"type": "http.response.body", "body": body})
