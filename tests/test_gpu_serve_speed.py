"""bench/gpu_serve_speed.py and bench/gpu_serve_defaults.py, the GPU check's serving steps, run on CPU
with two layers: random checkpoints of SmolLM2's shape that vLLM serves without a tokenizer, source
and Tucker side by side; a tiny model converted and healed here, served by `tucker-serve serve` with no
sizes given."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
SCRIPT = Path(__file__).parents[1] / "bench" / "gpu_serve_speed.py"
DEFAULTS = SCRIPT.with_name("gpu_serve_defaults.py")


def test_decode_speed_of_random_source_and_tucker_checkpoints(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--layers", "2", "--eager", "--batches", "2",
           "--contexts", "64", "--new-tokens", "8", "--cache-dtypes", "auto", "--kv-cache-gb", "0.05"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"source", "tucker 1.2x"} and result["device"] == "cpu"
    assert rows["source"]["vs_source"] == 1 and rows["tucker 1.2x"]["tokens_per_s"] > 0
    # the random Tucker checkpoint has the default conversion's latent: r3 = rt3 = 160 of the source's 384
    assert rows["tucker 1.2x"]["capacity_tokens"] == pytest.approx(1.2 * rows["source"]["capacity_tokens"], rel=0.05)
    tucker = json.loads((tmp_path / "speed" / "tucker-1.2x" / "config.json").read_text())["tucker"]
    assert (tucker["r3"], tucker["rt3"]) == (160, 160)


def test_serve_without_sizes_gets_the_platforms_defaults(tmp_path):
    out = tmp_path / "defaults.json"
    proc = subprocess.run([sys.executable, str(DEFAULTS), "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    memory = result["memory"]
    assert result["platform"] == "cpu" and result["passed"]
    assert (memory["weights_dtype"], memory["max_model_len"], memory["cache_sized_by"]) == (
        "float32", 2048, "kv_cache_memory_bytes")
    assert 0.98 * 2**30 <= memory["cache_bytes"] <= 2**30  # the 1 GiB CPU default
    healing = result["healing"]
    assert healing["device"] == "cpu" and len(healing["kl_per_step"]) == 4
    assert all(0 < kl < 5 for kl in healing["kl_per_step"])  # measured: 0.90, 0.84, 0.86, 0.86
    assert result["completion"]["usage"]["completion_tokens"] == 8
