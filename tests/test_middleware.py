"""TuckerMiddleware at the ASGI level, no engine: the key, exempt paths, body and header bounds, each
asserting the status sent and how many body bytes the middleware read."""

import asyncio
import json

import pytest

from tucker_server.middleware import MAX_HEADER_BYTES, MAX_HEADER_COUNT, OPEN_PATH_BODY_BYTES, TuckerMiddleware

KEY = "s3cret"
LIMIT = 64 * 2**10


class Client:
    """One request through the middleware: the body is fed in chunks and every byte taken is counted."""

    def __init__(self, chunks):
        self.chunks, self.read, self.sent, self.app_body = list(chunks), 0, [], None

    async def receive(self):
        if not self.chunks:
            return {"type": "http.disconnect"}
        chunk = self.chunks.pop(0)
        self.read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}

    async def send(self, message):
        self.sent.append(message)

    async def app(self, scope, receive, send):  # the wrapped server: reads the whole body, answers 200
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.app_body = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def error(self) -> dict:
        return json.loads(self.sent[1]["body"])["error"]


@pytest.fixture
def env(monkeypatch):
    for name in ("TUCKER_API_KEY", "TUCKER_METRICS_NEED_KEY", "TUCKER_MAX_BODY_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TUCKER_API_KEY", KEY)
    monkeypatch.setenv("TUCKER_MAX_BODY_BYTES", str(LIMIT))
    return monkeypatch


def call(method, path, headers=(), chunks=(b"",), key=KEY, scope_type="http"):
    client = Client(chunks)
    raw = [(k.lower().encode(), v.encode()) for k, v in headers]
    if key is not None:
        raw.append((b"authorization", f"Bearer {key}".encode()))
    scope = {"type": scope_type, "method": method, "path": path, "root_path": "", "headers": raw}
    asyncio.run(TuckerMiddleware(client.app)(scope, client.receive, client.send))
    return client


@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_a_blank_key_refuses_to_start(env, blank):
    env.setenv("TUCKER_API_KEY", blank)
    with pytest.raises(ValueError, match="TUCKER_API_KEY is empty"):
        TuckerMiddleware(lambda *a: None)


def test_the_key_guards_every_path_but_health_and_metrics(env):
    assert call("GET", "/v1/models").status == 200
    for path in ("/v1/models", "/v1/memory", "/tokenize", "/", "/v1/completions"):
        denied = call("GET", path, key="wrong")
        assert denied.status == 401 and denied.error["type"] == "AuthenticationError" and denied.app_body is None
    assert call("GET", "/v1/models", key=None).status == 401
    assert call("GET", "/health", key=None).status == 200 and call("GET", "/metrics/", key=None).status == 200
    env.setenv("TUCKER_METRICS_NEED_KEY", "1")
    assert call("GET", "/metrics", key=None).status == 401
    closed = call("GET", "/v1/realtime", key="wrong", scope_type="websocket")
    assert closed.sent == [{"type": "websocket.close", "code": 1008}]


def test_exempt_paths_take_no_body_beyond_a_few_kib(env):
    announced = call("POST", "/health", [("content-length", str(4 * 2**20))], chunks=[b"x" * 2**20] * 4, key=None)
    assert announced.status == 413 and announced.read == 0  # refused before a byte is read
    streamed = call("POST", "/health", [("transfer-encoding", "chunked")], chunks=[b"x" * 1024] * 4096, key=None)
    assert streamed.status == 413 and streamed.read <= OPEN_PATH_BODY_BYTES + 1024
    get_with_body = call("GET", "/metrics", [("content-length", "100000")], chunks=[b"x" * 100000], key=None)
    assert get_with_body.status == 413 and get_with_body.read == 0
    small = call("POST", "/health", [("content-length", "2")], chunks=[b"{}"], key=None)
    assert small.status == 200 and small.app_body == b"{}"


def test_keyed_paths_bound_bodies_announced_or_streamed(env):
    announced = call("POST", "/v1/completions", [("content-length", str(LIMIT + 1))], chunks=[b"x" * (LIMIT + 1)])
    assert announced.status == 413 and announced.read == 0
    streamed = call("POST", "/v1/completions", [("transfer-encoding", "chunked")], chunks=[b"x" * 4096] * 64)
    assert streamed.status == 413 and LIMIT < streamed.read <= LIMIT + 4096
    body = json.dumps({"prompt": "é" * 100}).encode()
    ok = call("POST", "/v1/completions", [("content-type", "application/json"), ("content-length", str(len(body)))],
              chunks=[body[:50], body[50:]])
    assert ok.status == 200 and ok.app_body == body  # handed on whole, once


@pytest.mark.parametrize("length", ["abc", "-1", "1e3", "²", " ", "0x10", "1" * 19])
def test_a_malformed_content_length_is_400(env, length):
    bad = call("POST", "/v1/completions", [("content-length", length)], chunks=[b"{}"])
    assert bad.status == 400 and "Content-Length" in bad.error["message"] and bad.read == 0


def test_conflicting_content_lengths_are_400(env):
    bad = call("POST", "/v1/completions", [("content-length", "2"), ("content-length", "3")], chunks=[b"{}"])
    assert bad.status == 400 and bad.read == 0


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON", "application/json; charset=latin-1",
                                          "APPLICATION/VND.API+JSON", None])
def test_non_utf8_is_400_whatever_the_case_or_absence_of_the_json_type(env, content_type):
    headers = [("content-type", content_type)] if content_type else []
    bad = call("POST", "/v1/completions", headers, chunks=[b'{"prompt": "\xff\xfe"}'])
    assert bad.status == 400 and "UTF-8" in bad.error["message"] and bad.app_body is None


def test_binary_uploads_that_say_so_pass(env):
    upload = call("POST", "/v1/audio/transcriptions", [("content-type", "multipart/form-data; boundary=x")],
                  chunks=[b"\xff\xfe\x00"])
    assert upload.status == 200 and upload.app_body == b"\xff\xfe\x00"


def test_header_count_and_size_are_bounded(env):
    many = call("GET", "/v1/models", [(f"x-h{i}", "v") for i in range(MAX_HEADER_COUNT)])
    assert many.status == 431
    assert call("GET", "/v1/models", [(f"x-h{i}", "v") for i in range(MAX_HEADER_COUNT - 2)]).status == 200
    big = call("GET", "/health", [("x-big", "a" * MAX_HEADER_BYTES)], key=None)
    assert big.status == 431 and big.error["code"] == 431
