"""Tensor parallelism on CPU (tensor_parallel_size=2): query heads and the output fold sharded,
the latent projections and cache replicated; parity with the single-process reference."""

import pytest

from helpers import LOGPROB_TOL, VOCAB, max_logprob_error, prompts, run, write_tiny_checkpoint
from tucker_serve.model import TuckerLlama

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module", params=[False, True], ids=["dense-core", "block-core"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp") / f"tiny-{request.param}"
    return write_tiny_checkpoint(folder, seed=2, block_core=request.param)


def test_two_ranks_match_the_reference(checkpoint, start_llm, monkeypatch):
    # vLLM's automatic binding wants one NUMA node per rank; this machine has one: bind by hand.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = start_llm(model=str(checkpoint), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                    tensor_parallel_size=2, block_size=16, max_model_len=256, max_logprobs=-1,
                    kv_cache_memory_bytes=2**22, seed=0)
    reference = TuckerLlama.from_pretrained(checkpoint)
    batch = prompts([6, 50], seed=8)
    for prompt, out in zip(batch, run(llm, batch)):
        worst, entries = max_logprob_error(reference, prompt, out)
        assert entries == (len(prompt) - 1 + 6) * VOCAB
        assert worst <= LOGPROB_TOL
