"""Where an fp8 latent cache loses quality: the reference model's wiki perplexity with its latent
keys and values stored as float, as fp8 e4m3 with vLLM's unit scales, as e4m3 with a per-tensor
scale that rules out clamping (max |x| / 448), as e5m2 (wider range, fewer mantissa bits), and as
vLLM 0.32's CPU attention kernel stores e4m3 numbers that were not rounded first (it truncates them
toward zero; the served model rounds its latents to nearest before vLLM stores them, which is the
"e4m3 unit scale" row).

    .venv/bin/python bench/fp8_scales.py runs/bench-peer/models/x2 --out docs/bench/fp8_scales.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tucker_serve.evaluate import perplexity, text_windows
from tucker_serve.model import TuckerLlama
from tucker_serve.cache_dtypes import rounding_dtypes
from tucker_serve.ops.paged import round_to_cache
from tucker_serve.sources import load_tokenizer
from tucker_serve.text import load_text

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def vllm_cpu_store(x: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    """What vLLM's CPU attention reads back (float32) for the numbers x stored in an fp8 cache with
    unit scale: they go through its `cpu_attn_reshape_and_cache` as the values of whole blocks. The
    store is monotone and element-wise, so sorting the stored bytes pairs them with the sorted
    inputs, whatever the kernel's layout inside a block."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    block, width = 32, 64
    flat = x.reshape(-1)
    blocks = -(-flat.numel() // (block * width))
    padded = torch.cat((flat, flat[:1].expand(blocks * block * width - flat.numel())))  # equal in, equal out
    values = padded.view(blocks * block, 1, width)
    key_cache, value_cache = torch.zeros(blocks, 1, 2 * block, width, dtype=torch.uint8).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(values, values, key_cache, value_cache, torch.arange(blocks * block),
                                   _get_attn_isa(x.dtype, block, width, kv_cache_dtype), k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype=kv_cache_dtype)
    stored = value_cache.contiguous().view(rounding_dtypes()[kv_cache_dtype]).float().reshape(-1).sort().values
    out = torch.empty_like(stored)
    out[padded.float().argsort(stable=True)] = stored
    return out[: flat.numel()].view(x.shape)


def rounding(mode: str):
    def cached(t: torch.Tensor) -> torch.Tensor:
        if mode == "e4m3 unit scale":
            return round_to_cache(t, E4M3)
        if mode == "e4m3 max scale":
            scale = t.abs().max().clamp_min(1e-12) / 448
            return round_to_cache(t / scale, E4M3) * scale
        if mode == "e5m2 unit scale":
            return round_to_cache(t, E5M2)
        if mode == "e4m3 vLLM CPU store":
            return vllm_cpu_store(t, "fp8").to(t.dtype)
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
    modes = ("float", "e4m3 unit scale", "e4m3 max scale", "e5m2 unit scale", "e4m3 vLLM CPU store")
    for mode in modes:
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
