"""Long-context quality, the parts that need only a tokenizer: retrieval prompts and long windows.

Retrieval: a five-digit pass key stated once at a chosen depth of a long text, asked for at the
end of the same one-turn chat (the model's chat template). The text is real (`wiki`: the evaluation
split, never seen by calibration) or the classic repeated filler (`filler`). A case counts as found
when the key appears in the greedy answer.

Perplexity by position: windows of long text scored token by token, the negative log-likelihoods
averaged per position bucket, so that what compression costs far from the start is not averaged away
by the short-range tokens.

Served evaluation runs both through vLLM (`tucker_eval.long_context`).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from tucker_serve.chat import chat_ids, chat_template_or_error
from tucker_serve.checkpoint import ModelError
from tucker_serve.text import load_text

LENGTHS = (1024, 2048, 4096, 8192)
HAYSTACKS = ("wiki", "filler")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = "There is a pass key hidden in the text below. Find it and remember it."
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_TOKENS = 16
BUCKETS = (0, 256, 1024, 2048, 4096, 8192)  # position buckets [a, b) for perplexity


def fact(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@dataclass(frozen=True)
class RetrievalCase:
    haystack: str
    length: int  # the context the case needs: prompt plus ANSWER_TOKENS, at most this many tokens
    depth: float  # where the key sits, as a fraction of the text
    key: str
    prompt_ids: tuple[int, ...]

    def found(self, answer: str) -> bool:
        return self.key in answer


def _prompt_ids(tokenizer, text: str) -> list[int]:
    return chat_ids(tokenizer, f"{INTRO}\n\n{text}\n\n{QUESTION}")


def _haystack_ids(tokenizer, haystack: str, count: int, start: float) -> list[int]:
    """`count` token ids of text: the wiki evaluation split from `start` (a fraction of where it can
    begin), or repeated filler."""
    if haystack == "filler":
        unit = tokenizer(FILLER, add_special_tokens=False).input_ids
        return (unit * (count // len(unit) + 1))[:count]
    if haystack != "wiki":
        raise ValueError(f"unknown haystack {haystack!r}: {', '.join(HAYSTACKS)}")
    ids = wiki_ids(tokenizer)
    if len(ids) < count + 1:
        raise ModelError(f"the wiki evaluation text has {len(ids):,} tokens, fewer than {count:,}")
    first = int(start * (len(ids) - count))
    return ids[first: first + count]


_WIKI: dict = {}


def wiki_ids(tokenizer) -> list[int]:
    """The whole wiki evaluation split, tokenized once per tokenizer."""
    key = getattr(tokenizer, "name_or_path", id(tokenizer))
    if key not in _WIKI:
        _WIKI[key] = tokenizer(load_text("wiki", "eval"), add_special_tokens=False).input_ids
    return _WIKI[key]


def _insert(text: str, depth: float, sentence: str) -> str:
    """`sentence` after the sentence end nearest to `depth` of `text` (or at the very start/end)."""
    target = depth * len(text)
    ends = [m.end() for m in re.finditer(r"[.!?]\s+", text)] or [len(text)]
    cut = min([0, *ends, len(text)], key=lambda i: abs(i - target))
    return f"{text[:cut].rstrip()} {sentence} {text[cut:].lstrip()}".strip()


def retrieval_case(tokenizer, haystack: str, length: int, depth: float, seed: int) -> RetrievalCase:
    """One case whose prompt plus ANSWER_TOKENS fits in `length` tokens, within 16 tokens of it."""
    rng = random.Random(f"{haystack}-{length}-{seed}")
    key, start = str(rng.randrange(10000, 100000)), rng.random()
    budget = length - ANSWER_TOKENS
    count = budget - len(_prompt_ids(tokenizer, fact(key)))
    if count < 16:
        raise ModelError(f"a context of {length} tokens leaves no room for text around the pass key")
    for _ in range(8):  # the joined text re-tokenizes a little differently: correct the count and retry
        text = tokenizer.decode(_haystack_ids(tokenizer, haystack, count, start), skip_special_tokens=True)
        prompt = _prompt_ids(tokenizer, _insert(text, depth, fact(key)))
        if budget - 16 <= len(prompt) <= budget:
            return RetrievalCase(haystack, length, depth, key, tuple(prompt))
        count += budget - 8 - len(prompt)
    raise ModelError(f"could not fit a {haystack} retrieval prompt into {length} tokens")


def retrieval_cases(tokenizer, lengths=LENGTHS, trials: int = 8, haystacks=HAYSTACKS) -> list[RetrievalCase]:
    """`trials` cases per haystack and length, keys at evenly spaced depths (the same for every model)."""
    chat_template_or_error(tokenizer, "the long-context retrieval check")
    return [retrieval_case(tokenizer, h, n, (i + 0.5) / trials, seed=i)
            for h in haystacks for n in lengths for i in range(trials)]


def retrieval_summary(cases: list[RetrievalCase], answers: list[str]) -> dict:
    """{haystack: {length: {"found", "trials"}}} and the totals."""
    table: dict = {}
    for case, answer in zip(cases, answers):
        cell = table.setdefault(case.haystack, {}).setdefault(str(case.length), {"found": 0, "trials": 0})
        cell["found"] += case.found(answer)
        cell["trials"] += 1
    return {"by_haystack": table, "found": sum(c.found(a) for c, a in zip(cases, answers)), "cases": len(cases)}


def long_windows(tokenizer, window: int, count: int) -> list[list[int]]:
    """`count` non-overlapping windows of `window` tokens from the wiki evaluation split."""
    ids = wiki_ids(tokenizer)
    if len(ids) < window * count:
        raise ModelError(f"the wiki evaluation text has {len(ids):,} tokens, fewer than {count} x {window:,}")
    return [ids[i * window: (i + 1) * window] for i in range(count)]


def position_perplexity(token_nll: list[list[float]], buckets=BUCKETS) -> list[dict]:
    """Per-token NLLs (position 1 on: position 0 has no prediction) -> perplexity per position bucket."""
    rows = []
    for lo, hi in zip(buckets, buckets[1:]):
        values = [v for seq in token_nll for pos, v in enumerate(seq, start=1) if lo <= pos < hi]
        if values:
            rows.append({"from": lo, "to": hi, "tokens": len(values),
                         "perplexity": math.exp(sum(values) / len(values))})
    return rows
