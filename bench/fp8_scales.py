"""Where an fp8 latent cache loses quality: the reference model's wiki perplexity with its latent
keys and values stored as float, as fp8 e4m3 with vLLM's unit scales, as e4m3 with a per-tensor
scale that rules out clamping (max |x| / 448), and as e5m2 (wider range, fewer mantissa bits).

    .venv/bin/python bench/fp8_scales.py runs/bench-peer/models/x2 --out docs/bench/fp8_scales.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tucker_serve.evaluate import perplexity, text_windows
from tucker_serve.model import TuckerLlama
from tucker_serve.ops.paged import to_cache_dtype
from tucker_serve.sources import load_tokenizer
from tucker_serve.text import load_text

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def rounding(mode: str):
    def cached(t: torch.Tensor) -> torch.Tensor:
        if mode == "e4m3 unit scale":
            return to_cache_dtype(t, E4M3).to(t.dtype)
        if mode == "e4m3 max scale":
            scale = t.abs().max().clamp_min(1e-12) / 448
            return to_cache_dtype(t / scale, E4M3).to(t.dtype) * scale
        if mode == "e5m2 unit scale":
            return to_cache_dtype(t, E5M2).to(t.dtype)
        return t
    return cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    windows = text_windows(load_tokenizer(args.model), load_text("wiki", "eval"), args.tokens, 1024)
    result = {"model": args.model, "tokens": int(windows.numel()), "wiki_perplexity": {}}
    for mode in ("float", "e4m3 unit scale", "e4m3 max scale", "e5m2 unit scale"):
        model = TuckerLlama.from_pretrained(args.model)
        for module in model.modules():
            if hasattr(module, "cached"):
                module.cached = rounding(mode)
        with torch.no_grad():
            result["wiki_perplexity"][mode] = perplexity(model, windows, progress=False).perplexity
        print(mode, round(result["wiki_perplexity"][mode], 3), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
