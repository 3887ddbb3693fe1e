"""`tucker-serve serve` is vLLM's OpenAI server plus our plugins: real uvicorn on 127.0.0.1, driven by
vLLM's own benchmark client and the official openai client, scraped by a real Prometheus."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import httpx
import openai
import psutil
import pytest
import torch

from conftest import free_port, serve_process, server_process
from tucker_bench.serving import scrape, vllm_benchmark
from tucker_serve.model import TuckerLlama
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
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(server):
    return load_tokenizer(server["folder"])


def get(server, path, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{server['url']}{path}", headers=headers, timeout=30)


def post(server, path, body, key=KEY):
    return httpx.post(f"{server['url']}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def prometheus_text(server) -> dict[str, float]:
    """Samples of /metrics by name, summed over labels (one model, one engine)."""
    return scrape(server["url"], headers={"Authorization": f"Bearer {KEY}"})


@pytest.mark.parametrize("backend", ["openai", "openai-chat"])
def test_vllm_benchmark_client_completes_every_request(server, backend):
    # openai-chat sends message content as a list of parts; both send vLLM's sampling extras
    result = vllm_benchmark(server["url"], NAME, server["folder"], backend=backend, api_key=KEY,
                            input_len=64, output_len=16, num_prompts=8, concurrency=4)
    assert (result["completed"], result["failed"]) == (8, 0)
    assert result["total_output_tokens"] == 8 * 16


def test_chat_accepts_content_parts_and_explicit_nulls(client):
    text = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12,
        temperature=0)
    parts = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}],
        max_tokens=12, temperature=0, top_p=None, seed=None, stop=None, presence_penalty=None)
    assert parts.choices[0].message.content == text.choices[0].message.content
    assert parts.usage.prompt_tokens == text.usage.prompt_tokens


def test_completion_takes_vllm_sampling_extras_and_empty_logit_bias(client):
    out = client.completions.create(
        model=NAME, prompt="The capital of France is", max_tokens=10, temperature=0.7, seed=3, logit_bias={},
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 10})
    assert out.usage.completion_tokens == 10 and out.choices[0].finish_reason == "length"


def test_json_object_response_format_returns_a_json_object(client):
    out = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": 'Reply with JSON: {"city": "Paris"}'}],
        response_format={"type": "json_object"}, max_tokens=40, temperature=0)
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_echo_logprobs_give_lm_eval_loglikelihoods(client, server, tokenizer):
    # lm-eval's completions loglikelihood request: token ids, echo, one extra token, top-1 logprobs
    context, continuation = tokenizer("The capital of France is").input_ids, tokenizer(" Paris").input_ids
    ids = context + continuation
    out = client.completions.create(model=NAME, prompt=[ids], max_tokens=1, logprobs=1, echo=True, temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    got = sum(lp.token_logprobs[len(context):-1])
    with torch.no_grad():
        logits = TuckerLlama.from_pretrained(server["folder"])(torch.tensor([ids]))[0].log_softmax(-1)
    want = sum(logits[p - 1, ids[p]].item() for p in range(len(context), len(ids)))
    assert got == pytest.approx(want, abs=1e-3)


def test_stream_with_usage_equals_the_plain_completion(client):
    kwargs = dict(model=NAME, prompt="Anarchism is a political philosophy that", max_tokens=16, temperature=0)
    plain = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_tokenize_and_detokenize_round_trip(server, tokenizer):
    tokens = post(server, "/tokenize", {"model": NAME, "prompt": "Hello world"}).json()["tokens"]
    assert tokens == tokenizer("Hello world").input_ids
    assert post(server, "/detokenize", {"model": NAME, "tokens": tokens}).json()["prompt"] == "Hello world"


def test_responses_api_answers(client):
    out = client.responses.create(model=NAME, input="What is the capital of France?", max_output_tokens=12,
                                  temperature=0)
    assert out.output_text and 1 <= out.usage.output_tokens <= 12


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "n": 3, "temperature": 0}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "stop": [""]}),
    ("/v1/completions", {"prompt": "", "max_tokens": 4}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 600}),  # beyond the 512-token context
    ("/v1/completions", {"prompt": "word " * 600, "max_tokens": 1}),
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}),
    ("/v1/completions", {"prompt": [[10**9]], "max_tokens": 1}),  # token id outside the vocabulary
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{% if %}"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True,
                              "continue_final_message": True}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/completions", {"model": "gpt-9", "prompt": "Hi"}),
])
def test_client_mistakes_are_4xx_in_openai_error_shape(server, path, body):
    response = post(server, path, {"model": NAME, **body})
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["code"] == response.status_code


def test_api_key_is_required_except_for_health_and_metrics(server):
    bad = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for path in ("/v1/models", "/v1/memory", "/tokenize", "/version", "/load"):
        assert get(server, path, key=None).status_code == 401, path
    assert get(server, "/health", key=None).status_code == 200
    assert get(server, "/metrics", key=None).status_code == 200


def test_models_lists_the_served_model_with_its_folder_as_root(client, server):
    (model,) = client.models.list().data
    assert model.id == NAME and model.root == str(server["folder"])


def test_dockerfile_healthcheck_command_passes_against_the_server(server):
    from pathlib import Path

    dockerfile = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    command = json.loads(dockerfile.split("HEALTHCHECK", 1)[1].split("CMD", 1)[1].split("\n")[0])
    env = {**os.environ, "TUCKER_PORT": str(server["port"])}
    assert subprocess.run(command, env=env, timeout=30).returncode == 0
    env["TUCKER_PORT"] = "1"  # nothing listens there: the check must fail
    assert subprocess.run(command, env=env, timeout=30, capture_output=True).returncode != 0


def test_memory_document_and_tucker_gauges_agree_next_to_vllm_metrics(server, client):
    client.completions.create(model=NAME, prompt="Hello", max_tokens=2)
    memory = get(server, "/v1/memory").json()
    samples = prometheus_text(server)
    assert memory["compression_ratio"] == pytest.approx(2.0) and memory["cache_dtype"] == "float32"
    assert samples["tucker_kv_element_bytes"] == memory["bytes_per_element"] == 4
    assert samples["tucker_kv_compression_ratio"] == pytest.approx(memory["compression_ratio"])
    assert samples["tucker_kv_bytes_per_token"] == memory["bytes_per_token"] == 30 * 192 * 4
    assert samples["tucker_kv_source_bytes_per_token"] == memory["source_bytes_per_token"] == 30 * 384 * 4
    assert samples["tucker_kv_blocks_total"] == memory["blocks_total"]
    assert samples["tucker_kv_capacity_tokens"] == memory["capacity_tokens"] == memory["blocks_total"] * memory["block_size"]
    assert samples["vllm:generation_tokens_total"] > 0 and samples["vllm:prompt_tokens_total"] > 0
    # what serve chose on CPU and what it was asked
    assert (memory["weights_dtype"], memory["max_model_len"]) == ("float32", 512)
    assert memory["cache_sized_by"] == "kv_cache_memory_bytes"
    assert 0.98 * 2**28 <= memory["cache_bytes"] <= 2**28


def test_every_metric_the_grafana_dashboard_queries_is_served(server):
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parent.parent / "deploy/grafana/dashboards/kv-memory.json")
                           .read_text())
    queried = {m for p in dashboard["panels"] for t in p["targets"]
               for m in re.findall(r"tucker_\w+|vllm:\w+", t["expr"])}
    served = set(prometheus_text(server))
    assert len(queried) >= 15 and {m for m in queried if m.startswith("tucker_")} >= {
        "tucker_kv_bytes_per_token", "tucker_kv_compression_ratio", "tucker_kv_blocks_used"}
    assert queried <= served, queried - served


def test_disconnect_aborts_the_request_and_frees_its_blocks(server):
    body = {"model": NAME, "prompt": "Tell a long story.", "max_tokens": 400, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server['url']}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        time.sleep(1)
        assert prometheus_text(server)["vllm:num_requests_running"] == 1
        assert get(server, "/v1/memory").json()["blocks_used"] >= 1
    deadline = time.time() + 20
    while time.time() < deadline and get(server, "/v1/memory").json()["blocks_used"]:
        time.sleep(0.5)
    assert prometheus_text(server)["vllm:num_requests_running"] == 0
    assert get(server, "/v1/memory").json()["blocks_used"] == 0


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
    cmd = [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}"]
    with server_process(cmd, port, folder / "prometheus.log", health="/-/ready", timeout=60, stop_timeout=30):
        yield port


def query_prometheus(port: int, query: str) -> list:
    deadline, result = time.time() + 30, []
    while time.time() < deadline and not result:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query={query}", timeout=5) as r:
            result = json.load(r)["data"]["result"]
        time.sleep(1)
    return result


def test_prometheus_scrapes_tucker_and_vllm_metrics(server, prometheus):
    ratio = query_prometheus(prometheus, "tucker_kv_compression_ratio")
    assert ratio, "Prometheus never scraped tucker_kv_compression_ratio"
    assert float(ratio[0]["value"][1]) == pytest.approx(get(server, "/v1/memory").json()["compression_ratio"])
    assert ratio[0]["metric"]["model_name"] == NAME
    assert query_prometheus(prometheus, "vllm:kv_cache_usage_perc"), "no vllm:* metric scraped"


def test_engine_failure_mid_stream_ends_with_an_error_event_and_done(server):
    """Last in this module: it kills the engine, and the server then exits."""
    body = {"model": NAME, "prompt": "Tell a long story.", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{server['url']}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines)[6:])["choices"]
        engines = [p for p in psutil.Process(server["proc"].pid).children(recursive=True) if "EngineCore" in p.name()]
        assert len(engines) == 1
        engines[0].send_signal(signal.SIGKILL)
        events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    assert error["code"] == 500 and "EngineCore" in error["message"]
    try:
        code = server["proc"].wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the server kept running with a dead engine")
    # vLLM's server exits with status 0 after its engine died: supervisors must restart on any exit
    # (compose's `restart: unless-stopped` does); docs/reliability.md says so
    assert code == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server['url']}/health", timeout=5)
