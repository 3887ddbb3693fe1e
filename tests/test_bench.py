"""`tucker-serve bench --quick`: one run measures the source model and a 2x conversion through real
vLLM engines and writes the table, the JSON and the plots."""

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_quick_bench_reports_capacity_speed_and_quality(converted, tmp_path):
    out = tmp_path / "bench"
    shutil.copytree(converted(2.0), out / "models" / "x2")  # the session's conversion; bench reuses it
    cmd = [sys.executable, "-m", "tucker_cli", "bench", "--quick", "--kv-ratios", "2",
           "--contexts", "128", "--batch-sizes", "1,4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((out / "results.json").read_text())
    source, tucker = result["variants"]
    assert (source["variant"], tucker["variant"]) == ("source", "tucker 2x")
    assert tucker["compression_ratio"] == pytest.approx(2.0)
    assert 2 * tucker["bytes_per_token"] == source["bytes_per_token"]
    # vLLM's own block count for the same budget follows the byte formula
    assert tucker["capacity_vs_source"] == pytest.approx(2.0, rel=0.02)
    assert tucker["max_concurrency"]["128"] >= 2 * source["max_concurrency"]["128"] - 1
    for v in (source, tucker):
        assert [(d["batch"], d["context"]) for d in v["decode"]] == [(1, 128), (4, 128)]
        assert all(d["tokens_per_s"] > 0 and d["tpot_ms"] > 0 and d["fits_in_cache"] for d in v["decode"])
    assert all(d["speed_vs_source"] == 1 for d in source["decode"])
    # compression costs quality: the 2x model is worse than the source, and not broken
    assert source["wiki_perplexity"] < tucker["wiki_perplexity"] < 4 * source["wiki_perplexity"]
    assert "| tucker 2x | 192 |" in (out / "results.md").read_text()
    for plot in ("capacity.png", "throughput.png", "perplexity.png"):
        assert (out / plot).stat().st_size > 1000
