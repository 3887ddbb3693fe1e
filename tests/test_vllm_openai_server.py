"""vLLM's own OpenAI server, started directly, loads a Tucker checkpoint through the plugin entry point
and, with VLLM_PLUGINS=tucker, serves /v1/memory and the tucker_kv_* gauges; a model that is not
Tucker gets its own figures (compression 1.0)."""

import sys

import httpx
import pytest

from conftest import free_port, server_process
from helpers import greedy
from prometheus_client.parser import text_string_to_metric_families
from tucker_serve.evaluate import load_lm

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module", params=["tucker", "source"])
def server(request, converted, smollm2, tmp_path_factory):
    folder = converted(2.0) if request.param == "tucker" else smollm2.folder
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
           "--kv-cache-memory-bytes", str(2**28)]
    log = tmp_path_factory.mktemp("vllm-api") / "server.log"
    with server_process(cmd, port, log, env={"VLLM_PLUGINS": "tucker", "VLLM_CPU_KVCACHE_SPACE": None}) as running:
        yield request.param, folder, running["url"]


def test_memory_document_and_gauges_describe_the_model(server):
    kind, folder, url = server
    memory = httpx.get(f"{url}/v1/memory", timeout=10).json()
    width = 192 if kind == "tucker" else 384  # SmolLM2: 3 KV heads x 64 x (K, V); 2x Tucker: r3 + rt3
    assert memory["kv_width_per_token_per_layer"] == width
    assert memory["bytes_per_token"] == 30 * width * 4 and memory["source_bytes_per_token"] == 30 * 384 * 4
    assert memory["compression_ratio"] == (2.0 if kind == "tucker" else 1.0)
    assert memory["capacity_tokens"] == memory["blocks_total"] * memory["block_size"]
    # vLLM sized the cache from the same budget: its block count follows the bytes formula
    assert memory["capacity_tokens"] == pytest.approx(2**28 / memory["bytes_per_token"], rel=0.02)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)}
    ratio = families["tucker_kv_compression_ratio"].samples
    assert len(ratio) == 1 and ratio[0].value == memory["compression_ratio"]
    assert len(families["vllm:kv_cache_usage_perc"].samples) == 1


def test_completion_from_vllm_api_server_equals_reference_greedy_text(server):
    import openai

    kind, folder, url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    prompt = "The capital of France is"
    out = client.completions.create(model=str(folder), prompt=prompt, max_tokens=8, temperature=0)
    reference, tok, _ = load_lm(str(folder))  # the reference TuckerLlama, or transformers for the source
    assert out.usage.completion_tokens == 8
    assert out.choices[0].text == tok.decode(greedy(reference, tok(prompt).input_ids, 8))
