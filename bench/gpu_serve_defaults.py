"""`tucker-serve serve` with no sizes given, on whatever platform this is, of a model converted and
healed there: what the engine got, and that it answers.

    python bench/gpu_serve_defaults.py --out runs/gpu/serve_defaults.json

Makes a tiny bfloat16 Llama with a word-level tokenizer (tucker_bench.tiny: a GPU machine has no
weights or texts), converts it at 2x and heals it for 4 steps on this machine's device (CUDA when
present, bf16 autocast), then serves the healed folder through `tucker-serve serve` with no --dtype,
--kv-cache-gb or --max-model-len. Fails unless /v1/memory shows the platform's defaults
(docs/deploy.md, "Sizes by platform": on CPU float32 weights, a 1 GiB cache and 2,048 tokens;
elsewhere the checkpoint's bf16, a cache sized by vLLM's --gpu-memory-utilization and the model's
4,096 tokens) and a completion comes back. Part of bench/gpu_check.sh; tested on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import httpx

from tucker_bench.serving import free_port, serve_command, server_process
from tucker_bench.tiny import WORDS, offline_source

# Two layers, every id a word of the tokenizer, a context longer than the CPU default's 2,048 tokens.
SOURCE = dict(vocab_size=WORDS + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.2, tie_word_embeddings=False)


def healed_model(work: Path) -> tuple[Path, dict]:
    """Convert the tiny source at 2x and heal it for 4 steps, both on the default device; the healed
    folder and the healing report. Caches (teacher, text) stay inside `work`."""
    os.environ["TUCKER_SERVE_CACHE"] = str(work / "cache")
    from tucker_serve.convert import ConvertOptions, convert
    from tucker_serve.heal import HealOptions, heal

    source, text = offline_source(work, SOURCE)
    convert(str(source), work / "2x", ConvertOptions(kv_ratio=2.0, calib_text=str(text), calib_tokens=1024,
                                                      calib_window=256), progress=False)
    opt = HealOptions(steps=4, batch=4, seq=64, chat=0, text=str(text), teacher_windows=16, eval_tokens=0)
    return work / "healed", heal(work / "2x", work / "healed", opt, progress=False)["healing"]


def expected(platform: str, folder: Path) -> dict:
    """What /v1/memory must show for the checkpoint in `folder`: serve's CPU_DEFAULTS on CPU, vLLM's
    own choices elsewhere (the checkpoint's dtype and context, a cache sized by memory utilization)."""
    from tucker_server.launcher import CPU_DEFAULTS

    if platform == "cpu":
        return {"weights_dtype": CPU_DEFAULTS["dtype"], "max_model_len": CPU_DEFAULTS["max_model_len"],
                "cache_sized_by": "kv_cache_memory_bytes"}
    config = json.loads((folder / "config.json").read_text())
    return {"weights_dtype": config["dtype"], "max_model_len": config["max_position_embeddings"],
            "cache_sized_by": "gpu_memory_utilization="}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file; the checkpoint and the server log go beside it")
    opt = parser.parse_args()
    out = Path(opt.out)
    from tucker_server.launcher import platform_name

    platform = platform_name()
    tucker, healing = healed_model(out.with_suffix(""))
    print(f"healed on {healing['device']}: KL per step {[round(k, 4) for k in healing['kl_per_step']]}")
    port = free_port()
    with server_process(serve_command(tucker, port, "--enforce-eager"), port, out.with_suffix(".log")) as server:
        memory = httpx.get(f"{server['url']}/v1/memory", timeout=10).json()
        completion = httpx.post(f"{server['url']}/v1/completions", timeout=60, json={
            "model": memory["model"], "prompt": "w1 w2 w3 w4", "max_tokens": 8, "temperature": 0}).json()
    want = expected(platform, tucker)
    got = {k: memory[k] for k in want}
    answer = completion.get("choices", [{}])[0]
    ok = all(got[k].startswith(v) if k == "cache_sized_by" else got[k] == v for k, v in want.items())
    ok = ok and answer.get("finish_reason") == "length" and completion.get("usage", {}).get("completion_tokens") == 8
    out.write_text(json.dumps({"platform": platform, "passed": ok, "expected": want, "memory": memory,
                               "healing": healing, "completion": completion}, indent=2))
    print(f"serve defaults on {platform}: {got}; cache {memory['cache_bytes'] / 2**30:.2f} GiB, "
          f"{memory['capacity_tokens']:,} tokens; answer {answer.get('text')!r}" + ("" if ok else f"; EXPECTED {want}"))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
