"""`tucker-serve serve` with no sizes given, on whatever platform this is: what the engine got.

    python bench/gpu_serve_defaults.py --out runs/gpu/serve_defaults.json

Serves a random two-layer Tucker checkpoint of SmolLM2's shape (bench/gpu_serve_speed.py's, bf16,
an 8,192-token context; a GPU machine has no weights or tokenizer) through `tucker-serve serve`
with no --dtype, --kv-cache-gb or --max-model-len, reads /v1/memory and fails unless the engine
got the platform's defaults (docs/deploy.md, "Sizes by platform"): on CPU float32 weights, a 1 GiB
cache and 2,048 tokens; elsewhere the checkpoint's bf16, a cache sized by vLLM's
--gpu-memory-utilization and the model's 8,192 tokens. Part of bench/gpu_check.sh; tested on CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx

from gpu_serve_speed import checkpoints
from tucker_bench.serving import free_port, serve_command, server_process


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
    _, tucker = checkpoints(out.with_suffix(""), "smollm2-135m", 1.2, layers=2)
    port = free_port()
    cmd = serve_command(tucker, port, "--enforce-eager", "--", "--skip-tokenizer-init")
    with server_process(cmd, port, out.with_suffix(".log")) as server:
        memory = httpx.get(f"{server['url']}/v1/memory", timeout=10).json()
    want = expected(platform, tucker)
    got = {k: memory[k] for k in want}
    ok = all(got[k].startswith(v) if k == "cache_sized_by" else got[k] == v for k, v in want.items())
    out.write_text(json.dumps({"platform": platform, "passed": ok, "expected": want, "memory": memory}, indent=2))
    print(f"serve defaults on {platform}: {got}; cache {memory['cache_bytes'] / 2**30:.2f} GiB, "
          f"{memory['capacity_tokens']:,} tokens" + ("" if ok else f"; EXPECTED {want}"))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
