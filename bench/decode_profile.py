"""Where one decode step's time goes, the default Tucker model against its source, under vLLM.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python bench/decode_profile.py --out docs/bench/decode_profile

Each model is served by a vLLM engine in its own process, in bfloat16 (eager mode: forward hooks on vLLM's
own modules time each part; compiled mode fuses them), a batch of random prompts is prefilled, and
every decode step that follows is timed part by part: the QKV projection (Tucker: each head's
latent query and the latent key and value), RoPE (Tucker: latent RoPE), vLLM's attention layer
(cache store and attention), the output projection, the rest of the attention module (Tucker: the
split and the fp8 rounding), the MLP, the norms, and what the model's forward spends outside its
layers, and the LM head (vLLM computes logits after the forward). Next to each part: its arithmetic per decoded token from the shapes (multiply-adds), and the
rate it ran at. Writes profile.json and profile.md under --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from collections import defaultdict
from pathlib import Path

from tucker_serve.checkpoint import per_layer

PARTS = {"self_attn.qkv_proj": "qkv projection", "self_attn.rotary_emb": "rope", "self_attn.attn": "attention + cache store",
         "self_attn.o_proj": "output projection", "mlp": "mlp", "input_layernorm": "norms",
         "post_attention_layernorm": "norms"}
TIMES: dict = defaultdict(float)  # (part) -> seconds over decode steps, filled by the hooks
STEPS = {"decode": 0, "batch": 0}
SEEN: list = []


def hook(model, batch: int) -> None:
    """Forward hooks on every layer's parts and on the model; only decode steps (batch tokens) count."""
    hooked = set()

    def timed(module, name):
        if id(module) in hooked:  # vLLM shares one RoPE module between layers: time each call once
            return
        hooked.add(id(module))
        def pre(_, args):
            module._t0 = time.perf_counter()

        def post(_, args, kwargs, out):  # vLLM passes some inputs by keyword
            tokens = next((a.shape[0] for a in (*args, *kwargs.values()) if hasattr(a, "shape")), None)
            if tokens == batch:
                TIMES[name] += time.perf_counter() - module._t0
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post, with_kwargs=True)

    inner = model.model
    forward = inner.forward  # vLLM's compile decorator calls forward directly: module hooks would not fire

    def model_forward(input_ids, positions, *args, **kwargs):
        start = time.perf_counter()
        out = forward(input_ids, positions, *args, **kwargs)
        SEEN.append(positions.shape[0])
        if positions.shape[0] == batch:
            TIMES["model"] += time.perf_counter() - start
            STEPS["decode"] += 1
        return out
    inner.forward = model_forward
    logits = model.compute_logits

    def compute_logits(hidden, *args, **kwargs):
        start = time.perf_counter()
        out = logits(hidden, *args, **kwargs)
        if hidden.shape[0] == batch:
            TIMES["logits"] += time.perf_counter() - start
        return out
    model.compute_logits = compute_logits
    for layer in inner.layers:
        timed(layer.self_attn, "attention module")
        timed(layer, "layer")
        for path, part in PARTS.items():
            timed(layer.get_submodule(path), path)


def arithmetic(config: dict, ctx: int) -> dict:
    """Multiply-adds per decoded token per part, over all layers (attention over `ctx` cached tokens)."""
    d, L, i = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    H = config["num_attention_heads"]
    t = config.get("tucker")
    if t:  # widths per layer (lists) or one for every layer
        r3s, rt3s = (per_layer(t, name, L, "config.json") for name in ("r3", "rt3"))
        qkv = sum(d * (H * r3 + r3 + rt3) for r3, rt3 in zip(r3s, rt3s))
        out, attn = sum(H * rt3 * d for rt3 in rt3s), sum(H * ctx * (r3 + rt3) for r3, rt3 in zip(r3s, rt3s))
    else:
        D, G = config.get("head_dim", d // H), config["num_key_value_heads"]
        qkv, out, attn = L * d * (H + 2 * G) * D, L * H * D * d, L * H * ctx * 2 * D
    return {"self_attn.qkv_proj": qkv, "self_attn.o_proj": out, "self_attn.attn": attn,
            "mlp": L * 3 * d * i, "logits": config["vocab_size"] * d}


def profile(folder: Path, batch: int, ctx: int, new_tokens: int) -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from tucker_vllm import configure_cpu

    configure_cpu(1)
    TIMES.clear()
    STEPS.update(decode=0, batch=batch)
    llm = LLM(model=str(folder), dtype="bfloat16", enforce_eager=True, max_model_len=ctx + new_tokens + 8,
              kv_cache_memory_bytes=2**30, enable_prefix_caching=False, seed=0, skip_tokenizer_init=True)
    try:
        llm.apply_model(lambda model: hook(model, batch))
        config = json.loads((folder / "config.json").read_text())
        g = torch.Generator().manual_seed(0)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in
                   torch.randint(100, config["vocab_size"] - 100, (batch, ctx), generator=g).tolist()]
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
    finally:
        llm.llm_engine.engine_core.shutdown()
    steps = STEPS["decode"]
    if not steps:
        raise RuntimeError(f"no decode step was timed (token counts seen: {SEEN[:20]}): is VLLM_ENABLE_V1_MULTIPROCESSING=0 set?")
    per_step = {k: v / steps * 1e3 for k, v in TIMES.items()}  # ms per decode step, all layers
    parts = defaultdict(float)
    for path, part in PARTS.items():
        parts[part] += per_step[path]
    inside = sum(per_step[p] for p in PARTS if p.startswith("self_attn."))
    parts["rest of the attention module"] = per_step["attention module"] - inside
    parts["rest of the layer (residual adds)"] = per_step["layer"] - per_step["attention module"] - \
        per_step["mlp"] - per_step["input_layernorm"] - per_step["post_attention_layernorm"]
    parts["model outside the layers (embedding, final norm)"] = per_step["model"] - per_step["layer"]
    parts["LM head (logits, outside the forward)"] = per_step["logits"]
    macs = arithmetic(config, ctx)
    rows = []
    for part, ms in parts.items():
        key = "logits" if part.startswith("LM head") else \
            next((p for p, name in PARTS.items() if name == part and p in macs), None)
        m = macs.get(key) if key else None
        rows.append({"part": part, "ms_per_step": ms, "macs_per_token": m,
                     "gmacs_per_s": m * batch / (ms / 1e3) / 1e9 if m else None})
    return {"folder": folder.name, "decode_steps": steps, "batch": batch, "context": ctx, "wall_s": wall,
            "model_ms_per_step": per_step["model"], "parts": rows}


def table(results: dict) -> str:
    names = list(results)
    parts = list(dict.fromkeys(r["part"] for res in results.values() for r in res["parts"]))
    res0 = next(iter(results.values()))
    lines = [f"One decode step, batch {res0['batch']} at {res0['context']} tokens, bfloat16, eager, vLLM on CPU "
             "(ms per step over all layers; multiply-adds per decoded token; GMAC/s achieved):", "",
             "| part | " + " | ".join(f"{n}: ms | {n}: MACs/token | {n}: GMAC/s" for n in names) + " |",
             "|" + " --- |" * (1 + 3 * len(names))]
    for part in parts:
        cells = []
        for n in names:
            r = next((r for r in results[n]["parts"] if r["part"] == part), None)
            cells += [f"{r['ms_per_step']:.2f}" if r else "-",
                      f"{r['macs_per_token']:,}" if r and r["macs_per_token"] else "",
                      f"{r['gmacs_per_s']:.1f}" if r and r["gmacs_per_s"] else ""]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines.append("| whole model forward | " + " | ".join(
        f"{results[n]['model_ms_per_step']:.2f} | |" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from tucker_serve.model_cache import row_folder
    from tucker_serve.options import listing
    from tucker_serve.sources import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEFAULT_MODEL)
    parser.add_argument("--models", type=listing(str), default=("source", "1.2"), help="rows as bench/serving.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise SystemExit("set VLLM_ENABLE_V1_MULTIPROCESSING=0: the hooks time the model in this process")
    results = {}
    for model in args.models:
        name = "source" if model == "source" else f"tucker {model}"
        folder = row_folder(args.source, model)
        # Each model in a fresh process: a second engine in the same process ran at half speed
        # (the default model at 2,048 tokens: 275 ms per step after the source, 142 ms alone).
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            results[name] = pool.apply(profile, (folder, args.batch, args.context, args.new_tokens))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(results, indent=2))
    (out / "profile.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
