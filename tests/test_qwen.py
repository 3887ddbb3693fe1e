"""The second real checkpoint, Qwen2.5-Coder-0.5B-Instruct (Qwen2: 14 heads, 2 KV heads of 64, q/k/v
biases), end to end: exact at full rank, and a 2x conversion served by vLLM as the reference
generates. Runs only where its weights are installed (`tucker-serve convert --model
qwen2.5-coder-0.5b ...` installs them on first use; the default set-up does not)."""

import json

import pytest
import torch

from helpers import greedy
from tucker_serve.sources import builtin_installed

NAME = "qwen2.5-coder-0.5b"
pytestmark = [pytest.mark.qwen, pytest.mark.slow,
              pytest.mark.skipif(not builtin_installed(NAME), reason=f"{NAME} is not installed")]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from tucker_serve.convert import ConvertOptions, convert
    from tucker_serve.sources import resolve

    out = tmp_path_factory.mktemp("qwen")
    convert(NAME, out / "full", ConvertOptions(full_rank=True, calib_text="wiki", calib_tokens=1024), progress=False)
    convert(NAME, out / "x2", ConvertOptions(kv_ratio=2.0), progress=False)
    return resolve(NAME).folder, out / "full", out / "x2"


def test_full_rank_conversion_equals_the_source(qwen):
    from tucker_serve.model import TuckerLlama
    from tucker_serve.sources import load_hf_model

    source, full, _ = qwen
    ids = torch.randint(0, 150000, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (TuckerLlama.from_pretrained(full)(ids) - load_hf_model(source)(ids).logits).abs().max().item()
    assert diff <= 1e-3
    config = json.loads((full / "config.json").read_text())
    assert config["tucker"]["qkv_bias"] and config["tucker"]["source_kv_width"] == 2 * 2 * 64


@pytest.mark.vllm
def test_vllm_serves_the_2x_conversion_as_the_reference_generates(qwen, start_llm):
    from vllm import SamplingParams

    from tucker_serve.model import TuckerLlama
    from tucker_serve.sources import load_tokenizer

    _, _, x2 = qwen
    llm = start_llm(model=str(x2), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=2**28,
                    max_model_len=1024, seed=0)
    tok = load_tokenizer(x2)
    prompt = "def fibonacci(n):\n    "
    out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), use_tqdm=False)
    reference = TuckerLlama.from_pretrained(x2)
    assert list(out[0].outputs[0].token_ids) == greedy(reference, tok(prompt).input_ids, 12)
