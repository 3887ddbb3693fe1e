"""vLLM engine on a tiny random Tucker checkpoint: parity with the PyTorch reference under
ragged batches, chunked prefill, prefix caching and multi-block contexts; clear load errors."""

import re
import subprocess
import sys

import pytest

from helpers import LOGPROB_TOL, VOCAB, greedy, max_logprob_error, prompts, run, write_tiny_checkpoint
from tucker_serve.model import TuckerLlama

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tucker-tiny")


@pytest.fixture(scope="module")
def llm(tiny, start_llm):
    # Small blocks and a small token budget per step: contexts span many blocks and long
    # prompts are prefilled in chunks over several steps.
    return start_llm(model=str(tiny), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                     block_size=16, max_num_batched_tokens=64, max_model_len=512, max_logprobs=-1,
                     kv_cache_memory_bytes=8 * 2**20, seed=0)


@pytest.fixture(scope="module")
def reference(tiny):
    return TuckerLlama.from_pretrained(tiny)


def test_ragged_batch_matches_reference_on_prefill_and_decode(llm, reference):
    batch = prompts([3, 16, 17, 150, 70], seed=1)  # 150 > 64 tokens per step: chunked prefill
    outputs = run(llm, batch)
    for prompt, out in zip(batch, outputs):
        worst, entries = max_logprob_error(reference, prompt, out)
        assert entries >= (len(prompt) - 1 + 6) * VOCAB  # full vocabulary at every position
        assert worst <= LOGPROB_TOL


def test_greedy_tokens_equal_reference_greedy_decoding(llm, reference):
    batch = prompts([5, 40, 90], seed=2)
    for prompt, out in zip(batch, run(llm, batch, max_tokens=12)):
        assert list(out.outputs[0].token_ids) == greedy(reference, prompt, 12)


def test_prefix_cached_prompt_matches_reference(llm, reference):
    shared = prompts([80], seed=3)[0]
    first = shared + prompts([7], seed=4)[0]
    second = shared + prompts([9], seed=5)[0]
    run(llm, [first], prompt_logprobs=False)
    # Prompt log-probs would force a full recomputation: ask for output log-probs only.
    (out,) = run(llm, [second], prompt_logprobs=False)
    assert out.num_cached_tokens == 80  # the five 16-token blocks of the shared prefix
    worst, entries = max_logprob_error(reference, second, out)
    assert entries == 6 * VOCAB
    assert worst <= LOGPROB_TOL


def test_checkpoint_with_wrong_rank_fails_at_load_naming_the_tensor(tiny, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    config = json.loads((bad / "config.json").read_text())
    config["tucker"]["rt3"] = 18
    (bad / "config.json").write_text(json.dumps(config))
    err = start_engine_and_capture_error(bad)
    # The first tensor (in file order) whose shape depends on rt3 is named with both shapes.
    assert re.search(r"tensor model\.layers\.0\.self_attn\.\w+ has shape \(4, 48, 20\), "
                     r"the ranks in config\.json need \(4, 48, 18\)", err), err[-2000:]


def test_checkpoint_without_latent_rope_fails_at_load_naming_the_field(tiny, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    config = json.loads((bad / "config.json").read_text())
    del config["tucker"]["latent_rope_freqs"]
    (bad / "config.json").write_text(json.dumps(config))
    assert "missing field 'tucker.latent_rope_freqs'" in start_engine_and_capture_error(bad)


def start_engine_and_capture_error(folder) -> str:
    code = (
        "from vllm import LLM\n"
        f"LLM(model={str(folder)!r}, skip_tokenizer_init=True, dtype='float32', enforce_eager=True,"
        " kv_cache_memory_bytes=2**22)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    return proc.stdout + proc.stderr
