"""`tucker-serve eval --long`: long-context quality of a model as it is served by vLLM (greedy, its
chat template, the cache dtype it is served with): pass-key retrieval at each context length in real
text and in filler, and perplexity by position bucket over long windows (`tucker_serve.long_context`
builds the prompts and windows, the same for every model)."""

from __future__ import annotations

import asyncio
import time

from tucker_eval.engine import served_answers, served_token_nll, start_engine
from tucker_serve import long_context as lc
from tucker_serve.checkpoint import read_config
from tucker_serve.sources import load_tokenizer, resolve


async def pass_key_answers(engine, tokenizer, cases) -> list[str]:
    """The served model's greedy answers to the pass-key `cases`, as text."""
    answers = await served_answers(engine, [list(c.prompt_ids) for c in cases], lc.ANSWER_TOKENS)
    return [tokenizer.decode(a, skip_special_tokens=True) for a in answers]


async def measure(engine, tokenizer, cases, windows) -> tuple[list, list]:
    """Both measurements in one event loop (an AsyncLLM stays bound to the loop it first ran in)."""
    text = await pass_key_answers(engine, tokenizer, cases)
    return text, (await served_token_nll(engine, windows) if windows else [])


def long_context_eval(model_spec: str, kv_cache_dtype: str = "auto", lengths=lc.LENGTHS, trials: int = 8,
                      haystacks=lc.HAYSTACKS, windows: int = 2, dtype: str = "float32", kv_cache_gb: float = 1.0,
                      progress: bool = True) -> dict:
    """Retrieval found per haystack and length, and perplexity per position bucket over `windows`
    windows of the longest length (less ANSWER_TOKENS); lengths beyond the model's context are left out (listed)."""
    model = resolve(model_spec)
    tokenizer = load_tokenizer(model.folder)
    limit = int(read_config(model.folder).get("max_position_embeddings", 2048))
    kept, skipped = [n for n in lengths if n <= limit], [n for n in lengths if n > limit]
    if not kept:
        raise ValueError(f"every length in {list(lengths)} exceeds the model's context of {limit} tokens")
    cases = lc.retrieval_cases(tokenizer, kept, trials, haystacks)
    longest = max(kept)
    window = longest - lc.ANSWER_TOKENS  # room for the one token vLLM generates after the prompt
    ppl_windows = lc.long_windows(tokenizer, window, windows) if windows else []
    start = time.time()
    engine = start_engine(model.folder, model.folder.name, longest, kv_cache_gb, dtype, kv_cache_dtype)
    try:
        if progress:
            print(f"long context: {len(cases)} retrieval prompts and {len(ppl_windows)} windows of {window:,} tokens",
                  flush=True)
        text, nll = asyncio.run(measure(engine, tokenizer, cases, ppl_windows))
    finally:
        engine.shutdown()
    return {
        "model": model_spec, "kv_cache_dtype": kv_cache_dtype, "dtype": dtype, "trials": trials,
        "lengths": kept, "lengths_beyond_context": skipped, "retrieval": lc.retrieval_summary(cases, text),
        "position_perplexity": {"window": window, "windows": len(ppl_windows),
                                "buckets": lc.position_perplexity(nll)},
        "seconds": round(time.time() - start, 1),
        "answers": [{"haystack": c.haystack, "length": c.length, "prompt_tokens": len(c.prompt_ids),
                     "depth": c.depth, "key": c.key, "answer": t, "found": c.found(t)} for c, t in zip(cases, text)],
    }
