"""`tucker-serve bench --quick`: one run measures the source model and a 2x conversion, each with a
bf16 and an fp8 KV cache, through real vLLM engines, and writes the table, the JSON and the plot."""

import json
import shutil
import subprocess
import sys

import pytest

from tucker_bench import BenchOptions

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
FP8_COST = 1.04
BATCH, NEW_TOKENS = BenchOptions.quick().batch, BenchOptions.quick().new_tokens


def assert_frontier_plot(path, panels: int, points: int) -> None:
    """A real PNG of the expected size with the variants' coloured markers on it (black is the source)."""
    from matplotlib.image import imread

    image = imread(path)[..., :3]  # (H, W, RGB) in 0..1
    assert image.shape[:2] == (504, 720 * panels)
    saturated = (image.max(-1) - image.min(-1)) > 0.4  # marker colours; text, axes and grid are grey
    assert saturated.sum() >= 20 * (points - 2) * panels


def test_quick_bench_reports_capacity_quality_and_speed_per_cache_dtype(converted, tmp_path):
    out = tmp_path / "bench"
    shutil.copytree(converted(2.0), out / "models" / converted(2.0).name)  # the session's; bench reuses it
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
    # fp8 costs some quality, compression more; nothing breaks. FP8_COST bounds what the fp8 latent may add:
    # rounded to nearest it added 0.5% on these tokens (36.82 -> 37.02), vLLM's truncating CPU store more
    assert source["wiki_perplexity"] < tucker["wiki_perplexity"] < 4 * source["wiki_perplexity"]
    assert tucker["wiki_perplexity"] < tucker_fp8["wiki_perplexity"] < FP8_COST * tucker["wiki_perplexity"]
    # vLLM's own fp8 cache on the source: its CPU store truncates, and what that costs depends on the CPU's
    # kernels (+1.3% on 16 windows in docs/bench, +6.3% on these 2,048 tokens on an AMX Xeon)
    assert source["wiki_perplexity"] < source_fp8["wiki_perplexity"] < 1.10 * source["wiki_perplexity"]
    for r in rows.values():
        d = r["decode"][0]
        assert [d["context"] for d in r["decode"]] == [256] and d["batch"] == BATCH
        # the rate, the time per output token and the wall time describe one run (not a speed target)
        assert d["tpot_ms"] == pytest.approx(1000 * d["batch"] / d["tokens_per_s"], rel=1e-6)
        assert (NEW_TOKENS - 1) * d["tpot_ms"] / 1000 <= 1.5 * d["wall_s"]
    assert source["decode"][0]["speed_vs_source"] == 1
    assert tucker["decode"][0]["speed_vs_source"] == pytest.approx(
        tucker["decode"][0]["tokens_per_s"] / source["decode"][0]["tokens_per_s"])
    # the pass-key columns: one case per haystack at 1,024 tokens, the same cases for every row
    assert all(r["long_context"]["cases"] == 2 and set(r["long_context"]["by_haystack"]) == {"wiki", "filler"}
               for r in rows.values())
    assert source["long_context"]["found"] == 2  # the source finds both keys at 1k (docs/quality.md: 16 of 16)
    assert "| tucker 2x | fp8 | 5,760 |" in (out / "results.md").read_text()
    assert "pass keys 1024" in (out / "results.md").read_text()
    assert_frontier_plot(out / "frontier.png", panels=2 if "chat" in source else 1, points=len(rows))

    # every measured row was kept as it finished; --resume reads them back instead of measuring again
    partial = json.loads((out / "rows.partial.json").read_text())["rows"]
    assert len(partial) == 4
    (out / "results.json").unlink()
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = {(r["variant"], r["cache_dtype"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert all(r["resumed"] for r in again.values())
    assert again["tucker 2x", "fp8"]["wiki_perplexity"] == tucker_fp8["wiki_perplexity"]
