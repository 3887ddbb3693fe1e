"""The HTTP server against a real uvicorn on 127.0.0.1, driven by the official openai client,
scraped by a real Prometheus."""

import json
import os
import shutil
import subprocess
import time
import urllib.request

import httpx
import openai
import pytest

from conftest import free_port, serve_process, wait_for_http
from tucker_serve.sources import load_tokenizer

pytestmark = [pytest.mark.server, pytest.mark.vllm, pytest.mark.slow]
KEY = "test-key-123"
NAME = "smollm2-tucker-test"


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with serve_process(converted(2.0), log_path, "--api-key", KEY, "--max-model-len", "512",
                       "--kv-cache-gb", "0.25", "--served-model-name", NAME) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(server):
    return load_tokenizer(server["folder"])


def get(server, path, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"http://127.0.0.1:{server['port']}{path}", headers=headers, timeout=30)


def prometheus_text(server) -> dict[str, float]:
    samples = {}
    for line in get(server, "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_completion_usage_counts_the_tokens_returned(client):
    out = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=12,
                                    temperature=0, logprobs=1)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == NAME
    assert out.usage.completion_tokens == len(choice.logprobs.tokens) <= 12
    assert "".join(choice.logprobs.tokens) == choice.text
    assert out.usage.prompt_tokens == 5 and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")


def test_completion_accepts_token_ids_lists_and_echo(client, tokenizer):
    ids = [tokenizer("Hello world").input_ids, tokenizer("One two").input_ids]
    out = client.completions.create(model=NAME, prompt=ids, max_tokens=3, temperature=0, echo=True)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text.startswith("Hello world") and out.choices[1].text.startswith("One two")
    assert out.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    texts = client.completions.create(model=NAME, prompt=["Hello world", "One two"], max_tokens=3, temperature=0)
    assert [c.text for c in texts.choices] == [c.text[len(p):] for c, p in zip(out.choices, ["Hello world", "One two"])]


def test_streamed_completion_equals_the_plain_one(client):
    kwargs = dict(model=NAME, prompt="Anarchism is a political philosophy that", max_tokens=16, temperature=0)
    plain = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason


def test_chat_uses_the_chat_template(client, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(prompt)
    assert 1 <= out.usage.completion_tokens <= 20 and out.choices[0].message.content


def test_streamed_chat_equals_the_plain_one_and_ends_with_done(client, server):
    messages = [{"role": "user", "content": "Name three colours."}]
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    raw = httpx.post(f"http://127.0.0.1:{server['port']}/v1/chat/completions", timeout=60,
                     headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": NAME, "messages": messages, "max_tokens": 4, "stream": True})
    events = [line for line in raw.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and raw.headers["content-type"].startswith("text/event-stream")


def test_n_samples_are_indexed_and_counted(client):
    out = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8, n=3,
                                    temperature=1.0, seed=7, logprobs=0)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices)


def test_stop_string_ends_the_completion(client):
    out = client.completions.create(model=NAME, prompt="1, 2, 3, 4, 5,", max_tokens=30, temperature=0, stop=[" 8"])
    assert " 8" not in out.choices[0].text
    assert out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs,param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 600}, "max_tokens"),  # beyond the 512-token context
])
def test_invalid_fields_are_400_with_the_param(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="Hi", **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="word " * 600, max_tokens=1)
    assert err.value.body["code"] == "context_length_exceeded"


def test_unknown_field_and_malformed_json_are_400(server):
    url = f"http://127.0.0.1:{server['port']}/v1/completions"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    extra = httpx.post(url, headers=headers, json={"model": NAME, "prompt": "x", "bogus": 1})
    assert extra.status_code == 400 and extra.json()["error"]["param"] == "bogus"
    broken = httpx.post(url, headers=headers, content=b'{"model": ')
    assert broken.status_code == 400
    assert set(broken.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-9", prompt="Hi", max_tokens=1)
    assert err.value.body["code"] == "model_not_found"


def test_api_key_is_required_except_for_health(server):
    port = server["port"]
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert get(server, "/v1/models", key=None).status_code == 401
    assert get(server, "/health", key=None).status_code == 200


def test_dockerfile_healthcheck_command_passes_against_the_server(server):
    from pathlib import Path

    dockerfile = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    command = json.loads(dockerfile.split("HEALTHCHECK", 1)[1].split("CMD", 1)[1].split("\n")[0])
    env = {**os.environ, "TUCKER_PORT": str(server["port"])}
    assert subprocess.run(command, env=env, timeout=30).returncode == 0
    env["TUCKER_PORT"] = "1"  # nothing listens there: the check must fail
    assert subprocess.run(command, env=env, timeout=30, capture_output=True).returncode != 0


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_metrics_agree_with_memory_document(server):
    memory = get(server, "/v1/memory").json()
    samples = prometheus_text(server)
    assert memory["compression_ratio"] == pytest.approx(2.0)
    assert samples["tucker_kv_compression_ratio"] == pytest.approx(memory["compression_ratio"])
    assert samples["tucker_kv_bytes_per_token"] == memory["bytes_per_token"] == 30 * 192 * 4
    assert samples["tucker_kv_source_bytes_per_token"] == memory["source_bytes_per_token"] == 30 * 384 * 4
    assert samples["tucker_kv_blocks_total"] == memory["blocks_total"]
    assert samples["tucker_kv_capacity_tokens"] == memory["capacity_tokens"] == memory["blocks_total"] * memory["block_size"]
    assert samples["tucker_generation_tokens_total"] > 0 and samples["tucker_prompt_tokens_total"] > 0
    assert samples["tucker_time_to_first_token_seconds_count"] > 0


def test_disconnect_aborts_the_request_and_frees_its_blocks(server):
    url = f"http://127.0.0.1:{server['port']}/v1/completions"
    body = {"model": NAME, "prompt": "Tell a long story.", "max_tokens": 400, "stream": True, "temperature": 0}
    with httpx.stream("POST", url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert get(server, "/v1/memory").json()["usage"] > 0 or prometheus_text(server)["tucker_requests_running"] >= 1
    deadline = time.time() + 20
    while time.time() < deadline:
        samples = prometheus_text(server)
        if samples["tucker_requests_running"] == 0 and get(server, "/v1/memory").json()["blocks_used"] == 0:
            break
        time.sleep(0.5)
    assert samples["tucker_requests_running"] == 0
    assert get(server, "/v1/memory").json()["blocks_used"] == 0
    assert samples["tucker_client_disconnects_total"] >= 1


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("Debian's prometheus is not installed: run `make setup`")
    folder = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    (folder / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "tucker", "static_configs": [{"targets": [f"127.0.0.1:{server['port']}"]}]}],
    }))
    with open(folder / "prometheus.log", "w") as log:
        proc = subprocess.Popen([binary, f"--config.file={folder / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/-/ready", proc, timeout=60)
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_prometheus_scrapes_the_compression_ratio(server, prometheus):
    query = f"http://127.0.0.1:{prometheus}/api/v1/query?query=tucker_kv_compression_ratio"
    deadline = time.time() + 30
    result = []
    while time.time() < deadline and not result:
        with urllib.request.urlopen(query, timeout=5) as r:
            result = json.load(r)["data"]["result"]
        time.sleep(1)
    assert result, "Prometheus never scraped tucker_kv_compression_ratio"
    assert float(result[0]["value"][1]) == pytest.approx(get(server, "/v1/memory").json()["compression_ratio"])
