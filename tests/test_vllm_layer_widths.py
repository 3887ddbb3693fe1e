"""vLLM on a checkpoint whose latent widths differ by layer: layer 0 caches r3 + rt3 = 12 + 20 numbers
per token (TUCKER backend), layer 1 64 + 64 (plain MQA: vLLM's own backend). vLLM holds both in one
cache group; its capacity must be the cache-layout formula over every layer's width, and its
log-probabilities the reference model's."""

import json

import pytest

from helpers import LOGPROB_TOL, RANKS, VOCAB, max_logprob_error, prompts, run, write_tiny_checkpoint
from tucker_serve import cache_layout as cl
from tucker_serve.model import TuckerLlama

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
BUDGET = 4 * 2**20
BY_LAYER = dict(RANKS, r3=[12, 64], rt3=[20, 64])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("widths") / "tucker-tiny", ranks=BY_LAYER)


@pytest.fixture(scope="module")
def llm(tiny, start_llm):
    # vLLM's CPU kernel takes blocks of multiples of 32 tokens; the TUCKER backend any size.
    return start_llm(model=str(tiny), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                     block_size=32, max_num_batched_tokens=64, max_model_len=512, max_logprobs=-1,
                     kv_cache_memory_bytes=BUDGET, seed=0)


def test_capacity_is_the_formula_over_every_layers_width(llm, tiny):
    layout = cl.model_layout(json.loads((tiny / "config.json").read_text()), "float32")
    assert layout.widths == (32, 128)
    cache = llm.llm_engine.vllm_config.cache_config
    assert cache.num_gpu_blocks * cache.block_size == BUDGET // (layout.bytes_per_token * cache.block_size) \
        * cache.block_size
    assert cache.num_gpu_blocks * cache.block_size == cl.capacity_tokens(BUDGET, 80, 2, "float32", cache.block_size)


def test_log_probs_match_the_reference_with_different_widths_per_layer(llm, tiny):
    reference = TuckerLlama.from_pretrained(tiny)
    batch = prompts([3, 17, 150], seed=1)  # 150 > 64 tokens per step: chunked prefill
    for prompt, out in zip(batch, run(llm, batch)):
        worst, entries = max_logprob_error(reference, prompt, out)
        assert entries >= (len(prompt) - 1 + 6) * VOCAB
        assert worst <= LOGPROB_TOL
