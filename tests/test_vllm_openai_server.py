"""vLLM's own OpenAI server loads a Tucker checkpoint through the plugin entry point."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import free_port, wait_for_http
from tucker_serve.model import TuckerLlama
from tucker_serve.sources import load_tokenizer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    folder = converted(2.0)
    port = free_port()
    log = open(tmp_path_factory.mktemp("vllm-api") / "server.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
         "--max-model-len", "512"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        yield folder, port
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def test_completion_from_vllm_api_server_equals_reference_greedy_text(server):
    import openai

    folder, port = server
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    prompt = "The capital of France is"
    out = client.completions.create(model=str(folder), prompt=prompt, max_tokens=8, temperature=0)
    tok = load_tokenizer(folder)
    ids = tok(prompt).input_ids
    reference = TuckerLlama.from_pretrained(folder)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(reference(torch.tensor([ids]))[0, -1].argmax()))
    assert out.usage.completion_tokens == 8
    assert out.choices[0].text == tok.decode(ids[-8:])
