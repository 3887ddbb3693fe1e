"""vLLM serving the converted real SmolLM2-135M: parity with the reference model, and the KV
capacity vLLM reports against the source model's under the same cache budget."""

import json

import pytest

from helpers import REAL_LOGPROB_TOL, greedy, max_logprob_error
from tucker_serve import cache_layout as cl
from tucker_serve.model import TuckerLlama

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
BUDGET = 96 * 2**20  # bytes of KV cache given to both engines
PROMPTS = [
    "The capital of France is",
    "Anarchism is a political philosophy that advocates self-governed societies based on voluntary "
    "institutions. These are often described as stateless societies, although",
    "def fibonacci(n):\n    ",
]


def engine(model: str):
    from vllm import LLM

    return LLM(model=model, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=BUDGET,
               max_model_len=1024, max_logprobs=-1, seed=0)


@pytest.fixture(scope="module")
def tucker_dir(converted):
    return converted(2.0)


@pytest.fixture(scope="module")
def llm(tucker_dir):
    yield engine(str(tucker_dir))


def test_full_vocabulary_logprobs_match_reference_on_batched_prompts(llm, tucker_dir):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tok = llm.get_tokenizer()
    batch = [tok(p).input_ids for p in PROMPTS]
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=-1, prompt_logprobs=-1,
                            ignore_eos=True, flat_logprobs=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
    reference = TuckerLlama.from_pretrained(tucker_dir).double()
    for prompt, out in zip(batch, outputs):
        worst, entries = max_logprob_error(reference, prompt, out)
        assert entries == (len(prompt) - 1 + 4) * 49152
        assert worst <= REAL_LOGPROB_TOL


def test_greedy_generation_equals_reference(llm, tucker_dir):
    from vllm import SamplingParams

    reference = TuckerLlama.from_pretrained(tucker_dir)
    tok = llm.get_tokenizer()
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)
    for text, out in zip(PROMPTS, outputs):
        assert list(out.outputs[0].token_ids) == greedy(reference, tok(text).input_ids, 16)


def test_capacity_follows_the_formula_and_the_compression_ratio(llm, tucker_dir, smollm2):
    report = json.loads((tucker_dir / "tucker_report.json").read_text())
    tucker_cache = llm.llm_engine.vllm_config.cache_config
    width = report["key_rank"] + report["value_rank"]
    block = tucker_cache.block_size
    assert tucker_cache.num_gpu_blocks * block == cl.capacity_tokens(BUDGET, width, 30, "float32", block)

    source = engine(str(smollm2.folder))
    source_cache = source.llm_engine.vllm_config.cache_config
    assert source_cache.num_gpu_blocks * block == cl.capacity_tokens(BUDGET, 384, 30, "float32", block)
    ratio = tucker_cache.num_gpu_blocks / source_cache.num_gpu_blocks
    assert ratio == pytest.approx(report["compression_ratio"], rel=0.02)
