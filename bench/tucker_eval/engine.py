"""One vLLM engine (AsyncLLM) configured as `tucker-serve serve` configures it, and what quality
measurements read from it through the served path (cache dtype included): perplexity from prompt
log-probs, greedy answers and teacher-forced agreement."""

from __future__ import annotations

import asyncio
import math
import uuid
from pathlib import Path


def start_engine(folder: Path, name: str, max_len: int, kv_cache_gb: float, dtype: str = "bfloat16",
                 kv_cache_dtype: str = "auto", eager: bool = True, tokenizer: bool = True):
    """vLLM's AsyncLLM on a model folder (no prefix caching: every measurement computes); without
    `tokenizer` the folder needs none and prompts are token ids only."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from tucker_vllm import configure_cpu

    configure_cpu(1)
    args = AsyncEngineArgs(model=str(folder), served_model_name=[name], dtype=dtype, max_model_len=max_len,
                           enforce_eager=eager, kv_cache_memory_bytes=int(kv_cache_gb * 2**30), seed=0,
                           enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype, max_logprobs=1,
                           disable_log_stats=True, skip_tokenizer_init=not tokenizer)
    return AsyncLLM.from_engine_args(args)


async def final_output(engine, prompt: list[int], params):
    from vllm.inputs import TokensPrompt

    out = None
    async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt), params, f"eval-{uuid.uuid4().hex}"):
        pass
    return out


async def served_token_nll(engine, windows: list[list[int]]) -> list[list[float]]:
    """Each window's per-token negative log-likelihoods (positions 1 on) from the engine's prompt log-probs."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
    outs = await asyncio.gather(*(final_output(engine, w, params) for w in windows))
    return [[-row[token].logprob for row, token in zip(out.prompt_logprobs[1:], w[1:])] for out, w in zip(outs, windows)]


async def served_perplexity(engine, windows: list[list[int]]) -> float:
    """Perplexity from the engine's prompt log-probs over non-overlapping windows."""
    nll = await served_token_nll(engine, windows)
    return math.exp(sum(map(sum, nll)) / sum(map(len, nll)))


async def served_answers(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy answers to tokenized chat prompts."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False)
    outs = await asyncio.gather(*(final_output(engine, p, params) for p in prompts))
    return [list(o.outputs[0].token_ids) for o in outs]


async def served_agreement(engine, pairs: list[tuple[list[int], list[int]]]) -> float:
    """Teacher-forced top-1 agreement on (prompt, answer) pairs: the share of answer tokens the
    engine ranks first when fed the answer so far."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
    outs = await asyncio.gather(*(final_output(engine, p + a, params) for p, a in pairs))
    ranks = [out.prompt_logprobs[len(p) + j][t].rank for out, (p, a) in zip(outs, pairs) for j, t in enumerate(a)]
    return sum(r == 1 for r in ranks) / max(len(ranks), 1)
