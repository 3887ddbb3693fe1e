"""`tucker-serve bench --quick`: one run measures the source model and a 2x conversion, each with a
bf16 and an fp8 KV cache, through real vLLM engines, and writes the table, the JSON and the plot."""

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_quick_bench_reports_capacity_quality_and_speed_per_cache_dtype(converted, tmp_path):
    out = tmp_path / "bench"
    shutil.copytree(converted(2.0), out / "models" / "x2")  # the session's conversion; bench reuses it
    cmd = [sys.executable, "-m", "tucker_cli", "bench", "--quick", "--kv-ratios", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = {(r["variant"], r["cache_dtype"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {("source", "bfloat16"), ("source", "fp8"), ("tucker 2x", "bfloat16"), ("tucker 2x", "fp8")}
    source, source_fp8 = rows["source", "bfloat16"], rows["source", "fp8"]
    tucker, tucker_fp8 = rows["tucker 2x", "bfloat16"], rows["tucker 2x", "fp8"]
    assert source["bytes_per_token"] == 30 * 384 * 2 and tucker_fp8["bytes_per_token"] == 30 * 192
    assert [r["compression_vs_source_bf16"] for r in (source, source_fp8, tucker, tucker_fp8)] == [1, 2, 2, 4]
    # vLLM's own block counts for the same budget follow the byte formula (within one block)
    for r in rows.values():
        assert r["tokens_per_gib"] == pytest.approx(2**30 / r["bytes_per_token"], rel=0.02)
    # fp8 costs some quality, compression more; nothing breaks (measured on these 2,048 tokens: the 2x
    # latent 37.1 -> 41.1 in fp8, +11%: its rounding error, not clamping, see docs/benchmarks.md)
    assert source["wiki_perplexity"] < tucker["wiki_perplexity"] < 4 * source["wiki_perplexity"]
    assert tucker["wiki_perplexity"] < tucker_fp8["wiki_perplexity"] < 1.2 * tucker["wiki_perplexity"]
    assert source_fp8["wiki_perplexity"] == pytest.approx(source["wiki_perplexity"], rel=0.05)
    for r in rows.values():
        assert [d["context"] for d in r["decode"]] == [256] and r["decode"][0]["tokens_per_s"] > 0
    assert source["decode"][0]["speed_vs_source"] == 1
    assert "| tucker 2x | fp8 | 5,760 |" in (out / "results.md").read_text()
    assert (out / "frontier.png").stat().st_size > 1000

    # every measured row was kept as it finished; --resume reads them back instead of measuring again
    partial = json.loads((out / "rows.partial.json").read_text())["rows"]
    assert len(partial) == 4
    (out / "results.json").unlink()
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = {(r["variant"], r["cache_dtype"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert all(r["resumed"] for r in again.values())
    assert again["tucker 2x", "fp8"]["wiki_perplexity"] == tucker_fp8["wiki_perplexity"]
