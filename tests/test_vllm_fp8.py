"""An fp8 KV cache (`kv_cache_dtype="fp8"`) against the reference model rounding its latents to fp8,
and its capacity: tiny checkpoints on the TUCKER backend (r3 != rt3, and a shared latent) and with
equal widths, which vLLM's own CPU attention serves (its store truncates; the model rounds first)."""

import pytest
import torch

from helpers import LAYERS, RANKS, max_logprob_error, prompts, run, write_tiny_checkpoint
from tucker_serve.model import TuckerLlama

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
FP8_TOL = 2e-3  # fp8 rounding of a value can flip on float32 noise between two equivalent computations


@pytest.fixture(scope="module", params=["separate", "shared", "equal"])
def case(request, tmp_path_factory, start_llm):
    shared = request.param == "shared"
    ranks = dict(RANKS, r3=32, rt3=32) if request.param == "equal" else None  # plain MQA: vLLM's attention
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("fp8") / "tiny", shared_latent=shared, ranks=ranks)
    llm = start_llm(model=str(folder), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                    block_size=32, max_num_batched_tokens=64, max_model_len=512, max_logprobs=-1,
                    kv_cache_memory_bytes=4 * 2**20, kv_cache_dtype="fp8", seed=0)
    ranks = ranks or RANKS
    return folder, llm, ranks["r3"] if shared else ranks["r3"] + ranks["rt3"]  # cached numbers per token


def test_fp8_cache_matches_the_reference_rounding_its_latents_to_fp8(case):
    folder, llm, _ = case
    rounded = TuckerLlama.from_pretrained(folder, cache_dtype=torch.float8_e4m3fn)
    exact = TuckerLlama.from_pretrained(folder)
    batch = prompts([3, 17, 150, 40], seed=7)
    worst_rounded = worst_exact = 0.0
    for prompt, out in zip(batch, run(llm, batch)):
        worst_rounded = max(worst_rounded, max_logprob_error(rounded, prompt, out)[0])
        worst_exact = max(worst_exact, max_logprob_error(exact, prompt, out)[0])
    assert worst_rounded <= FP8_TOL
    assert worst_exact > 10 * worst_rounded  # the cache really is fp8


def test_fp8_cache_holds_one_byte_per_latent_number(case):
    _, llm, width = case
    config = llm.llm_engine.vllm_config.cache_config
    per_block = LAYERS * width * 1 * config.block_size
    assert config.num_gpu_blocks == 4 * 2**20 // per_block
