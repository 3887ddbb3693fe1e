"""KV-cache arithmetic for larger models, from the one formula module (no model is loaded).

    .venv/bin/python bench/large_models.py

Bytes per token and how many 32K-token sequences fit on one 141 GB GPU, for Llama-3-8B with its GQA
cache and with Tucker latents at the ratios the SmolLM2 measurements support.
"""

from __future__ import annotations

import json
import sys

from tucker_serve import cache_layout as cl

GPU_BYTES = 141e9
UTILIZATION = 0.90  # vLLM's default gpu_memory_utilization
LLAMA3_8B = {"layers": 32, "heads": 32, "kv_heads": 8, "head_dim": 128, "params": 8.03e9}
CONTEXT = 32768
DTYPE = "bfloat16"


def rows(ratios=(1.5, 2, 3, 4)) -> list[dict]:
    m = LLAMA3_8B
    weights = m["params"] * cl.dtype_bytes(DTYPE)
    budget = int(GPU_BYTES * UTILIZATION - weights)
    source = cl.gqa_kv_width(m["kv_heads"], m["head_dim"])
    out = []
    latent = {r: 2 * round(source / r / 4) for r in ratios}  # r3 = rt3, even for latent RoPE
    for name, width in [("GQA (8 KV heads x 128)", source)] + [
            (f"Tucker {r:g}x (r3 = rt3 = {latent[r]})", 2 * latent[r]) for r in ratios]:
        cap = cl.capacity_tokens(budget, width, m["layers"], DTYPE, block_size=16)
        out.append({"cache": name, "numbers_per_token_per_layer": width,
                    "bytes_per_token": cl.kv_bytes_per_token(width, m["layers"], DTYPE),
                    "capacity_tokens": cap, "sequences_32k": int(cl.max_concurrency(cap, CONTEXT, 16)),
                    "kv_budget_bytes": budget})
    return out


def main() -> None:
    table = rows()
    print(f"Llama-3-8B, {DTYPE}, one {GPU_BYTES / 1e9:.0f} GB GPU at {UTILIZATION:.0%}, "
          f"weights {LLAMA3_8B['params'] * 2 / 1e9:.1f} GB, KV budget {table[0]['kv_budget_bytes'] / 1e9:.1f} GB")
    print(f"{'cache':<32}{'numbers':>9}{'bytes/token':>13}{'capacity':>14}{'32K seqs':>10}")
    for r in table:
        print(f"{r['cache']:<32}{r['numbers_per_token_per_layer']:>9}{r['bytes_per_token']:>13,}"
              f"{r['capacity_tokens']:>14,}{r['sequences_32k']:>10}")
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
