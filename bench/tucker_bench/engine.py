"""Speed and capacity of one vLLM engine (started by `tucker_eval.engine.start_engine`): the cache
capacity vLLM allocated and decode throughput with every request of a batch decoding."""

from __future__ import annotations

import asyncio
import time
import uuid


def capacity(engine) -> tuple[int, int]:
    """(tokens the cache holds, block size) as vLLM allocated them."""
    cache = engine.vllm_config.cache_config
    return cache.num_gpu_blocks * cache.block_size, cache.block_size


async def decode_rate(engine, vocab: int, batch: int, ctx: int, new_tokens: int, seed: int) -> dict:
    """Tokens/s and time per output token while every request of the batch is decoding."""
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(100, vocab - 100, (batch, ctx), generator=g).tolist()  # unique per request
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA, detokenize=False)
    arrivals: list[list[float]] = [[] for _ in range(batch)]
    tag = uuid.uuid4().hex[:8]

    async def one(i: int) -> None:
        async for out in engine.generate(TokensPrompt(prompt_token_ids=prompts[i]), params, f"bench-{tag}-{i}"):
            now = time.perf_counter()
            arrivals[i].extend([now] * len(out.outputs[0].token_ids))

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(batch)))
    all_decoding, first_done = max(a[0] for a in arrivals), min(a[-1] for a in arrivals)
    window = first_done - all_decoding
    tokens = sum(sum(1 for t in a if all_decoding < t <= first_done) for a in arrivals)
    if window <= 0 or tokens == 0:  # batch of one, or a degenerate window: use each request's own decode
        spans = [(a[-1] - a[0], len(a) - 1) for a in arrivals]
        window, tokens = max(s for s, _ in spans), sum(n for _, n in spans)
    return {"batch": batch, "context": ctx, "tokens_per_s": tokens / window,
            "tpot_ms": 1000 * window / (tokens / batch), "wall_s": time.perf_counter() - start}
