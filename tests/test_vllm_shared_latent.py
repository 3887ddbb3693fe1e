"""Shared-latent mode in vLLM: the cache holds one unrotated latent (r3 numbers) per token, keys
are rotated at read time; parity with the reference and half the bytes of separate K/V."""

import pytest

from helpers import (LAYERS, LOGPROB_TOL, RANKS, VOCAB, max_logprob_error, prompts, run,
                     write_tiny_checkpoint)
from tucker_serve import cache_layout as cl
from tucker_serve.model import TuckerLlama

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
BUDGET = 4 * 2**20


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("shared") / "tucker-shared", seed=1, shared_latent=True)


@pytest.fixture(scope="module")
def llm(shared, start_llm):
    return start_llm(model=str(shared), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                     block_size=16, max_num_batched_tokens=64, max_model_len=512, max_logprobs=-1,
                     kv_cache_memory_bytes=BUDGET, seed=0)


def test_shared_latent_matches_reference_on_prefill_chunks_and_decode(llm, shared):
    reference = TuckerLlama.from_pretrained(shared)
    batch = prompts([4, 33, 120], seed=6)
    for prompt, out in zip(batch, run(llm, batch)):
        worst, entries = max_logprob_error(reference, prompt, out)
        assert entries == (len(prompt) - 1 + 6) * VOCAB
        assert worst <= LOGPROB_TOL


def test_shared_latent_cache_holds_r3_numbers_per_token(llm):
    cache = llm.llm_engine.vllm_config.cache_config
    width = cl.tucker_kv_width(RANKS["r3"], RANKS["r3"], shared_latent=True)
    assert width == RANKS["r3"]
    assert cache.num_gpu_blocks * cache.block_size == cl.capacity_tokens(BUDGET, width, LAYERS, "float32", 16)
