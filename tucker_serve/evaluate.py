"""Perplexity over non-overlapping windows of real text, for source and Tucker models alike."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tucker_serve.checkpoint import ModelError
from tucker_serve.device import compute_device
from tucker_serve.long_context import LENGTHS
from tucker_serve.options import flag, invalid, listing, option
from tucker_serve.sources import load_source, load_tokenizer, resolve
from tucker_serve.text import load_text


@dataclass(frozen=True)
class EvalOptions:
    """`tucker-serve eval`: perplexity here (`evaluate`), or through vLLM chat fidelity (`chat`, in
    `tucker_eval.chat`) or long-context quality (`long`, in `tucker_eval.long_context`)."""

    text: str = option("wiki", str, "wiki, news or a UTF-8 file")
    tokens: int = option(16384, int, "tokens of the text to score")
    window: int = option(1024, int, "tokens per scored window")
    chat: bool = option(False, flag, "chat fidelity through vLLM: question set answered correctly, answers equal "
                                     "to the source's, teacher-forced agreement and KL on the source's answers")
    source: str | None = option(None, str, "the model to compare with (--chat)",
                                shown="the one recorded at conversion")
    max_tokens: int = option(48, int, "answer length for --chat")
    long: bool = option(False, flag, "long-context quality through vLLM: a pass key found in real text and in "
                                     "filler at each of --lengths, and perplexity by position over long windows")
    lengths: tuple[int, ...] = option(LENGTHS, listing(int), "context lengths in tokens for --long (those beyond "
                                                             "the model's context are left out)")
    trials: int = option(8, int, "pass keys per text and length for --long (at evenly spaced depths)")
    kv_cache_dtype: str = option("auto", str, "vLLM cache dtype for --chat and --long (auto, fp8, ...)")
    device: str = option("auto", str, "where the reference model scores (perplexity, --chat's teacher forcing): "
                                      "auto (CUDA when present), cuda, cuda:N or cpu")


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored (window - 1 per window)
    windows: int


def load_lm(spec: str, device: str = "cpu"):
    """(model, tokenizer, source) for any --model: the reference TuckerLlama or the transformers model,
    on `device` (tucker_serve.device). Both are callables input_ids (B, T) -> logits (B, T, vocab) on
    that device, from ids anywhere."""
    from tucker_serve.model import TuckerLlama

    on = compute_device(device)
    source = resolve(spec)
    tokenizer = load_tokenizer(source.folder)
    if source.is_tucker:
        tucker = TuckerLlama.from_pretrained(source.folder).to(on)
        return (lambda ids: tucker(ids.to(on))), tokenizer, source
    hf = load_source(source.folder, on)  # in its own dtype, computing in float32
    return (lambda ids: hf(ids.to(on)).logits), tokenizer, source


def text_windows(tokenizer, text: str, tokens: int, window: int) -> torch.Tensor:
    """The first `tokens` tokens of `text` as (n, window) non-overlapping windows."""
    if window < 2:
        raise ModelError(invalid("window", window, "must be at least 2"))
    ids = tokenizer(text[: tokens * 12], add_special_tokens=False).input_ids[:tokens]
    n = len(ids) // window
    if n == 0:
        raise ModelError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    return torch.tensor(ids[: n * window]).view(n, window)


@torch.no_grad()
def perplexity(lm, windows: torch.Tensor, batch: int = 4, progress: bool = True) -> Perplexity:
    total, count = 0.0, 0
    for chunk in tqdm(windows.split(batch), desc="evaluating", unit="batch", disable=not progress):
        logits = lm(chunk).float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten().to(logits.device), reduction="sum")
        total += nll.item()
        count += chunk[:, 1:].numel()
    return Perplexity(math.exp(total / count), total / count, count, windows.shape[0])


def evaluate(spec: str, text: str = EvalOptions.text, tokens: int = EvalOptions.tokens,
             window: int = EvalOptions.window, progress: bool = True, device: str = EvalOptions.device) -> dict:
    lm, tokenizer, source = load_lm(spec, device)
    result = perplexity(lm, text_windows(tokenizer, load_text(text, "eval"), tokens, window), progress=progress)
    return {"model": spec, "text": text, "window": window, "tucker": source.is_tucker, **result.__dict__}
