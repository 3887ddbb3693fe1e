"""Peak resident memory and time of converting a bfloat16 checkpoint of Llama-3.2-1B's shape at 2x,
measured, and the same model of memory computed for Llama-3-8B and Llama-3-70B shapes.

    .venv/bin/python bench/convert_memory.py docs/bench/convert_memory.json [--work runs/convert-memory]

The checkpoint has random weights (transformers' initialization) and Llama-3.2-1B's shape: 16 layers,
hidden 2048, 32 heads, 8 KV heads, intermediate 8192, tied embeddings; SmolLM2's 49,152-token
vocabulary and tokenizer stand in for Llama's 128,256, so the memory is measured against this
checkpoint's own size. It is written once under --work. `tucker-serve convert --kv-ratio 2
--calib-text wiki` (the other options at their defaults) runs in its own process, and its peak
resident memory is what the kernel reports for it (wait4's ru_maxrss). The same is measured for a
process that only imports the conversion code (the interpreter, torch and transformers), and for the
conversion again with glibc's own mmap threshold instead of the one conversion fixes
(`tucker_serve.device.host_frees_returned`).

The model of memory (docs/deploy.md, "Conversion memory") adds up the checkpoint in its own dtype,
the imports, every calibration window's hidden states, one layer's statistics and what a layer
holds while it runs; its 1B prediction is checked against the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ONE_B = dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=131072,
             rope_theta=500000.0, rms_norm_eps=1e-5)
SHAPES = {  # the shapes the model of memory is applied to (vocabularies as published)
    "Llama-3.2-1B (this checkpoint)": ONE_B,
    "Llama-3-8B": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "Llama-3-70B": dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
GB = 1e9
GLIBC_DEFAULT = ("import sys, tucker_cli, tucker_serve.convert as c; c.host_frees_returned = lambda: None; "
                 "sys.argv[0] = 'tucker-serve'; sys.exit(tucker_cli.main())")


def write_checkpoint(folder: Path) -> None:
    """Run in its own process (`--write`): this process forks the measured ones and must stay small,
    since a child starts from its parent's peak resident memory."""
    import torch
    import transformers as tf

    from tucker_serve.sources import resolve

    torch.manual_seed(0)
    with torch.device("cpu"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**ONE_B, dtype="bfloat16")).to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in resolve("smollm2-135m").folder.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, tmp / f.name)
    tmp.rename(folder)


def peak_of(argv: list[str]) -> tuple[int, float]:
    """(peak resident bytes, seconds) of a command run to completion; fails with its output if it fails."""
    start = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{out[-3000:]}")
    return usage.ru_maxrss * 1024, time.time() - start  # Linux reports kibibytes


def memory_model(shape: dict, tokens: int, window: int, baseline: int) -> dict:
    """The parts of the conversion's peak for a bfloat16 checkpoint of `shape` (uniform widths, text
    calibration), and what measured widths and chat calibration add: the LM head in float32 while
    it runs, and the measured windows' hidden states at every layer (defaults: 2 x 1,024 tokens)."""
    from tucker_serve.calibrate import MLP_TOKENS, QUERY_CHUNK_BYTES, AttentionShape, LayerStats, stats_bytes
    from tucker_serve.convert import ConvertOptions

    L, d, f, H, G, V = (shape[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                           "num_attention_heads", "num_key_value_heads", "vocab_size"))
    D = d // H
    layer = d * (H * D + 2 * G * D) + H * D * d + 3 * d * f + 2 * d
    params = L * layer + V * d * (1 if shape["tie_word_embeddings"] else 2) + d
    s = AttentionShape.from_config({**shape, "rope_theta": 500000.0, "model_type": "llama",
                                    "architectures": ["LlamaForCausalLM"]})
    parts = {
        "checkpoint (bfloat16)": 2 * params,
        "imports (measured)": baseline,
        "hidden states of every calibration window (float32)": 4 * tokens * d,
        "one layer's statistics (float64)": stats_bytes([LayerStats.zeros(s, "meta")]),
        "an MLP matrix in float32 while it runs": 4 * d * f,
        f"MLP activations of {MLP_TOKENS} tokens (float32, three)": 4 * 3 * MLP_TOKENS * f,
        "a window's layer input, output and residual (float32, four)": 4 * 4 * window * d,
        "attention probabilities of a chunk of queries (float32, two)": 2 * QUERY_CHUNK_BYTES,
    }
    total = sum(parts.values())
    opt = ConvertOptions()
    measured = 4 * V * d + 4 * L * opt.measure_windows * opt.measure_window * d
    return {"parameters": params, "parts_gb": {k: round(v / GB, 3) for k, v in parts.items()},
            "peak_gb": round(total / GB, 2), "peak_over_checkpoint": round(total / parts["checkpoint (bfloat16)"], 3),
            "measured_widths_add_gb": round(measured / GB, 2),
            "statistics_of_all_layers_gb": round(L * parts["one layer's statistics (float64)"] / GB, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--work", type=Path, default=Path("runs/convert-memory"))
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--calib-window", type=int, default=4096)
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    source = args.work / "llama-1b-shape-bf16"
    if args.write:
        return write_checkpoint(source)
    args.work.mkdir(parents=True, exist_ok=True)
    if not (source / "config.json").is_file():
        subprocess.run([sys.executable, __file__, str(args.out), "--work", str(args.work), "--write"], check=True)
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    cli = str(Path(sys.executable).with_name("tucker-serve"))
    baseline, _ = peak_of([sys.executable, "-c", "import torch, transformers, tucker_serve.convert; "
                                                 "transformers.LlamaForCausalLM"])
    out = args.work / "2x"
    convert = ["convert", "--model", str(source), "--out", str(out), "--kv-ratio", "2", "--calib-text", "wiki",
               "--calib-tokens", str(args.calib_tokens), "--calib-window", str(args.calib_window), "--device", "cpu",
               "--quiet"]
    # The same conversion with glibc's own mmap threshold (device.host_frees_returned skipped), right after.
    peak, seconds = peak_of([cli, *convert])
    glibc_peak, glibc_seconds = peak_of([sys.executable, "-c", GLIBC_DEFAULT, *convert])
    report = json.loads((out / "tucker_report.json").read_text())
    result = {
        "command": f"tucker-serve convert --model <checkpoint> --kv-ratio 2 --calib-text wiki --calib-tokens "
                   f"{args.calib_tokens} --calib-window {args.calib_window} --device cpu",
        "checkpoint": {"shape": ONE_B, "dtype": "bfloat16", "safetensors_bytes": size},
        "measured": {"peak_rss_bytes": peak, "peak_over_checkpoint": round(peak / size, 3),
                     "seconds": round(seconds, 1), "imports_peak_rss_bytes": baseline,
                     "written_dtype": report["dtype"], "compression_ratio": report["compression_ratio"],
                     "glibc_default_threshold": {"peak_rss_bytes": glibc_peak,
                                                 "peak_over_checkpoint": round(glibc_peak / size, 3),
                                                 "seconds": round(glibc_seconds, 1)}},
        "model_of_memory": {name: memory_model(shape, args.calib_tokens, args.calib_window, baseline)
                            for name, shape in SHAPES.items()},
        "machine": f"{os.cpu_count()} CPUs",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["measured"], indent=2))
    for name, m in result["model_of_memory"].items():
        print(f"{name}: computed peak {m['peak_gb']} GB = {m['peak_over_checkpoint']}x its bfloat16 checkpoint")


if __name__ == "__main__":
    main()
