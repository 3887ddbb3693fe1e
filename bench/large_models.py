"""KV-cache and decode arithmetic for real model shapes on one H200, from the one formula module
(tucker_serve/cache_layout.py); no model is loaded.

    .venv/bin/python bench/large_models.py docs/bench/large_models.json

1. Capacity: bytes per token and how many 32K-token sequences fit on one 141 GB GPU for Llama-3-8B
   with its GQA cache and with Tucker latents, after the weights as each model serves them.
2. Decode: the bytes one decode step reads per generated token and per layer (the layer's weights
   shared by the batch, plus the sequence's cache), and the decode rate that the H200's nominal
   4.8 TB/s allows when bandwidth is the bound, for Llama-3-8B and SmolLM2-135M shapes, the source
   with vLLM's bf16 and fp8 caches against Tucker at each ratio. Tucker's serving fold makes each
   head's query and output r3 wide instead of head_dim (cache_layout.folded_attention_params), so
   its weights grow while its cache shrinks: the rates say at which batch and context that pays.
"""

from __future__ import annotations

import json
import sys

from tucker_serve import cache_layout as cl

GPU_BYTES, BANDWIDTH = 141e9, 4.8e12  # H200: HBM3e capacity and nominal bandwidth (bytes/s)
UTILIZATION = 0.90  # vLLM's default gpu_memory_utilization
WEIGHTS = "bfloat16"
MODELS = {
    "Llama-3-8B": {"layers": 32, "hidden": 4096, "intermediate": 14336, "vocab": 128256, "tied": False,
                   "heads": 32, "kv_heads": 8, "head_dim": 128, "contexts": (4096, 32768)},
    "SmolLM2-135M": {"layers": 30, "hidden": 576, "intermediate": 1536, "vocab": 49152, "tied": True,
                     "heads": 9, "kv_heads": 3, "head_dim": 64, "contexts": (2048, 8192)},
}
RATIOS = (1.2, 1.5, 2, 3)
BATCHES = (1, 32)
CONTEXT = 32768  # the capacity table's sequence length


def variants(m: dict, ratios=RATIOS) -> list[dict]:
    """The source and each ratio (r3 = rt3, even for latent RoPE, as a default conversion picks them),
    each with its attention weights as served."""
    source = cl.gqa_kv_width(m["kv_heads"], m["head_dim"])
    out = [{"model": "source", "width": source,
            "attention_params": cl.gqa_params(m["hidden"], m["heads"], m["kv_heads"], m["head_dim"])}]
    for r in ratios:
        r3 = 2 * round(source / r / 4)
        out.append({"model": f"tucker {r:g}x (r3 = rt3 = {r3})", "width": 2 * r3,
                    "attention_params": cl.folded_attention_params(m["hidden"], m["heads"], r3, r3)})
    return out


def weights(m: dict, attention_params: int) -> dict:
    """Bytes of one layer's weights, of the weights one decode step reads, and of the weights in memory."""
    size = cl.dtype_bytes(WEIGHTS)
    layer = (attention_params + 3 * m["hidden"] * m["intermediate"]) * size
    head = m["vocab"] * m["hidden"] * size  # the LM head, read every step; embedding rows are only looked up
    return {"layer": layer, "read_per_step": m["layers"] * layer + head,
            "in_memory": m["layers"] * layer + (1 if m["tied"] else 2) * head}


def capacity_rows(name: str = "Llama-3-8B") -> list[dict]:
    m, out = MODELS[name], []
    for v in variants(m, (1.5, 2, 3, 4)):
        w = weights(m, v["attention_params"])
        budget = int(GPU_BYTES * UTILIZATION - w["in_memory"])
        cap = cl.capacity_tokens(budget, v["width"], m["layers"], WEIGHTS, block_size=16)
        out.append({"model": name, "cache": v["model"], "numbers_per_token_per_layer": v["width"],
                    "weights_bytes": w["in_memory"], "kv_budget_bytes": budget,
                    "bytes_per_token": cl.kv_bytes_per_token(v["width"], m["layers"], WEIGHTS),
                    "capacity_tokens": cap, "sequences_32k": int(cl.max_concurrency(cap, CONTEXT, 16))})
    return out


def decode_rows() -> list[dict]:
    out = []
    for name, m in MODELS.items():
        base = {}
        for v in variants(m):
            w = weights(m, v["attention_params"])
            budget = GPU_BYTES * UTILIZATION - w["in_memory"]
            for dtype in (WEIGHTS, "fp8"):
                kv_layer = v["width"] * cl.dtype_bytes(dtype)
                for context in m["contexts"]:
                    for batch in BATCHES:
                        step = cl.decode_bytes_per_step(w["read_per_step"], m["layers"] * kv_layer, context, batch)
                        rate = BANDWIDTH * batch / step
                        if v["model"] == "source" and dtype == WEIGHTS:
                            base[context, batch] = rate
                        out.append({"model": name, "variant": v["model"], "cache_dtype": dtype, "context": context,
                                    "batch": batch, "layer_weight_bytes": w["layer"],
                                    "kv_bytes_per_token_per_layer": kv_layer,
                                    "bytes_per_decoded_token_per_layer": w["layer"] / batch + context * kv_layer,
                                    "fits": batch * context * m["layers"] * kv_layer <= budget,
                                    "tokens_per_s_bound": rate, "vs_source_bf16": rate / base[context, batch]})
    return out


def markdown(capacity: list[dict], decode: list[dict]) -> str:
    lines = [f"Llama-3-8B, {WEIGHTS} weights, one {GPU_BYTES / 1e9:.0f} GB GPU at {UTILIZATION:.0%}, the weights "
             "as served:", "",
             "| cache | numbers/token/layer | weights GB | KV budget GB | bytes/token | capacity (tokens) | 32K-token sequences |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['cache']} | {r['numbers_per_token_per_layer']} | {r['weights_bytes'] / 1e9:.1f} "
              f"| {r['kv_budget_bytes'] / 1e9:.1f} | {r['bytes_per_token']:,} | {r['capacity_tokens']:,} "
              f"| {r['sequences_32k']} |" for r in capacity]
    for name in MODELS:
        rows = [r for r in decode if r["model"] == name]
        cols = sorted({(r["context"], r["batch"]) for r in rows})
        lines += ["", f"{name}: bytes read per decoded token per layer (weights / batch + context x cache), and the "
                  f"decode tokens/s that {BANDWIDTH / 1e12:.1f} TB/s allows (vs the source's bf16 cache; "
                  "- where the batch's cache does not fit):", "",
                  "| model | KV cache | layer weights MB | cache bytes/token/layer | "
                  + " | ".join(f"ctx {c:,} batch {b}: KB/token/layer, tok/s" for c, b in cols) + " |",
                  "|" + " --- |" * (4 + len(cols))]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            for dtype in (WEIGHTS, "fp8"):
                cells = [r for r in rows if r["variant"] == variant and r["cache_dtype"] == dtype]
                by = {(r["context"], r["batch"]): r for r in cells}
                lines.append(f"| {variant} | {dtype} | {cells[0]['layer_weight_bytes'] / 1e6:.1f} "
                             f"| {cells[0]['kv_bytes_per_token_per_layer']:,} | " + " | ".join(
                                 f"{by[c]['bytes_per_decoded_token_per_layer'] / 1e3:,.0f} KB, "
                                 + (f"{by[c]['tokens_per_s_bound']:,.0f} ({by[c]['vs_source_bf16']:.2f}x)"
                                    if by[c]["fits"] else "-") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    capacity, decode = capacity_rows(), decode_rows()
    text = markdown(capacity, decode)
    print(text)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"gpu_bytes": GPU_BYTES, "bandwidth_bytes_per_s": BANDWIDTH, "utilization": UTILIZATION,
                       "weights_dtype": WEIGHTS, "capacity": capacity, "decode": decode}, f, indent=2)
        with open(sys.argv[1].replace(".json", ".md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
