"""Decode tokens/s of a Tucker conversion against its source under vLLM, for the one prepared GPU check.

    python bench/gpu_serve_speed.py --out runs/gpu/serve_speed.json

A GPU machine has no model weights, tokenizer or text (nothing is downloaded), and decode speed
does not depend on the weights' values: both checkpoints are random, of SmolLM2-135M's shape (or
--shape llama-3.2-1b), the Tucker one in the default conversion's form (block cores, r3 = rt3 from
--ratio as a default conversion picks them, latent RoPE). Each is served by a vLLM engine started
as the benchmark starts it (bf16 weights, vLLM's compiled mode with CUDA graphs unless --eager),
with a bf16 and an fp8 cache, and decodes batches of random prompts (`tucker_bench.engine`); the
table gives tokens/s and each row against the source with a bf16 cache. Runs on CPU too (slowly),
which is how it is tested.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import torch

from tucker_serve.checkpoint import TuckerModelConfig, converted_config
from tucker_serve.options import listing
from tucker_serve.rope import default_inv_freq

SHAPES = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True,
                     "rope_theta": 100000.0},
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "tie_word_embeddings": True, "rope_theta": 500000.0},
}


def source_config(shape: str, layers: int | None = None) -> dict:
    s = dict(SHAPES[shape])
    theta = s.pop("rope_theta")
    if layers:
        s["num_hidden_layers"] = layers
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **s, "hidden_act": "silu",
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": theta,
            "rope_type": "default"}, "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False,
            "mlp_bias": False, "dtype": "bfloat16"}


def random_state(model: torch.nn.Module, seed: int) -> dict:
    """Weights scaled like a trained model's (unit-ish activations): decode speed needs finite logits only."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            scale = p.shape[-1] ** -0.5 if p.dim() > 1 else 0.02
            state[name] = (torch.randn(p.shape, generator=g) * scale).to(torch.bfloat16).contiguous()
    return state


def write(folder: Path, config: dict, state: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def checkpoints(root: Path, shape: str, ratio: float, layers: int | None = None) -> tuple[Path, Path]:
    """(source folder, Tucker folder), random, of `shape`; the Tucker one at `ratio`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tucker_serve.model import TuckerLlama

    cfg = source_config(shape, layers)
    with torch.device("meta"):
        source = LlamaForCausalLM(LlamaConfig(**cfg))
    state = {k: v for k, v in random_state(source, 0).items() if k != "lm_head.weight" or not cfg["tie_word_embeddings"]}
    src = write(root / "source", cfg, state)
    heads, head_dim, groups = cfg["num_attention_heads"], cfg["head_dim"], cfg["num_key_value_heads"]
    width = 2 * groups * head_dim
    r3 = 2 * round(width / ratio / 4)  # r3 = rt3, even for latent RoPE, as a default conversion picks them
    theta = cfg["rope_parameters"]["rope_theta"]
    freqs = [default_inv_freq(r3, theta).tolist()] * cfg["num_hidden_layers"]
    tcfg = converted_config(cfg, heads=heads, head_dim=head_dim, r3=r3, rt3=r3, qkv_bias=False, source_kv_width=width,
                            latent_rope_freqs=freqs, dtype="bfloat16")
    with torch.device("meta"):
        tucker = TuckerLlama(TuckerModelConfig.from_dict(tcfg))
    return src, write(root / f"tucker-{ratio:g}x", tcfg, random_state(tucker, 1))


async def measure(folder: Path, name: str, cache_dtype: str, opt) -> list[dict]:
    from tucker_bench.engine import capacity, decode_rate
    from tucker_eval.engine import start_engine

    max_len = max(opt.contexts) + opt.new_tokens + 8
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    engine = start_engine(folder, name, max_len, opt.kv_cache_gb, "bfloat16", cache_dtype, opt.eager, tokenizer=False)
    try:
        tokens, _ = capacity(engine)
        rows = []
        for ctx in opt.contexts:
            for batch in opt.batches:
                await decode_rate(engine, vocab, batch, ctx, 4, seed=1)  # warm-up (compiles, captures graphs)
                rate = await decode_rate(engine, vocab, batch, ctx, opt.new_tokens, seed=0)
                rows.append({"model": name, "cache_dtype": cache_dtype, "capacity_tokens": tokens, **rate})
        return rows
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (tests)")
    parser.add_argument("--ratio", type=float, default=1.2, help="the Tucker conversion's KV ratio (1.2 = default)")
    parser.add_argument("--batches", type=listing(int), default=(8, 32))
    parser.add_argument("--contexts", type=listing(int), default=(1024, 4096))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--cache-dtypes", type=listing(str), default=("auto", "fp8"))
    parser.add_argument("--kv-cache-gb", type=float, default=8.0)
    parser.add_argument("--eager", action="store_true", help="vLLM's eager mode (no compile, no CUDA graphs)")
    parser.add_argument("--out", required=True, help="JSON file; the checkpoints go beside it")
    opt = parser.parse_args()
    out = Path(opt.out)
    source, tucker = checkpoints(out.with_suffix(""), opt.shape, opt.ratio, opt.layers)
    rows = []
    for folder, name in ((source, "source"), (tucker, f"tucker {opt.ratio:g}x")):
        for cache in opt.cache_dtypes:
            rows += asyncio.run(measure(folder, name, cache, opt))
    base = {(r["context"], r["batch"]): r["tokens_per_s"] for r in rows
            if r["model"] == "source" and r["cache_dtype"] == opt.cache_dtypes[0]}
    for r in rows:
        r["vs_source"] = r["tokens_per_s"] / base[r["context"], r["batch"]]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out.write_text(json.dumps({"device": device, "shape": opt.shape, "layers": opt.layers, "ratio": opt.ratio,
                               "eager": opt.eager, "rows": rows}, indent=2))
    print(f"decode tokens/s on {device}, random {opt.shape} weights, bf16, "
          f"{'eager' if opt.eager else 'compiled'} (vs the source with a {opt.cache_dtypes[0]} cache):")
    for r in rows:
        print(f"  {r['model']:<12} {r['cache_dtype']:<5} ctx {r['context']:>5} batch {r['batch']:>3}: "
              f"{r['tokens_per_s']:9.1f} tok/s ({r['vs_source']:.2f}x), capacity {r['capacity_tokens']:,} tokens")


if __name__ == "__main__":
    main()
