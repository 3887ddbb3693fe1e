"""The capacity-bound serving benchmark (bench/serving.py): the source under vLLM's own server without
our plugins and a conversion under `tucker-serve serve` get the same engine arguments; one real row
under vLLM's benchmark client reports the client's figures, vLLM's sampled gauges, and the table and plot."""

import pytest

from tucker_bench.serving import CLIENT_KEYS, Load, serve_row, server_command, serving_plot, serving_table, summary


def test_source_and_conversion_servers_get_the_same_engine_arguments(tmp_path):
    load = Load(prompt_tokens=100, output_tokens=20, kv_cache_gb=0.5, eager=True)
    source, env = server_command(tmp_path / "source", True, "fp8", 8001, load)
    tucker, tucker_env = server_command(tmp_path / "tucker", False, "fp8", 8002, load)
    assert source[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and tucker[1:4] == ["-m", "tucker_cli", "serve"]
    assert env["VLLM_PLUGINS"] == "" and tucker_env == {}  # the source is plain vLLM; serve adds its plugins itself
    engine = ["--dtype", "bfloat16", "--kv-cache-dtype", "fp8", "--max-model-len", "128", "--served-model-name", "bench"]
    for cmd in (source, tucker):
        assert " ".join(engine) in " ".join(cmd) and cmd[-3:] == ["--max-num-seqs", "64", "--enforce-eager"]
    assert source[source.index("--kv-cache-memory-bytes") + 1] == str(2**29)
    assert tucker[tucker.index("--kv-cache-gb") + 1] == "0.5"  # serve turns it into the same bytes


def test_gauge_summaries_count_only_samples_with_requests_in_flight():
    samples = [{"running": 0, "waiting": 0}, {"running": 4, "waiting": 6}, {"running": 2, "waiting": 0},
               {"running": 0, "waiting": 0}]
    assert summary(samples, "running") == {"mean": 3.0, "max": 4}
    assert summary(samples, "waiting") == {"mean": 3.0, "max": 6}
    assert summary([], "running") == {"mean": 0.0, "max": 0.0}


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.server
def test_a_cache_bound_row_reports_waiting_requests_and_the_plot(smollm2, tmp_path):
    # 6 concurrent requests of 480 tokens against a cache of about 1,400 tokens (23,040 bytes per token
    # in bf16): vLLM can run only two at once, the rest wait
    load = Load(prompt_tokens=448, output_tokens=32, prompts=6, concurrency=6, kv_cache_gb=0.03, eager=True)
    row = serve_row("source", smollm2.folder, True, "auto", load, tmp_path)
    assert row["completed"] == 6 and row["failed"] == 0 and row["server"] == "vllm"
    assert set(CLIENT_KEYS) <= set(row) and row["p50_ttft_ms"] <= row["p99_ttft_ms"]
    assert row["capacity_tokens"] == pytest.approx(0.03 * 2**30 / 23_040, rel=0.1)
    assert 1 <= row["running"]["max"] <= row["capacity_tokens"] // 480 + 1 and row["waiting"]["max"] >= 1
    assert len(row["samples"]) >= 4 and row["preemptions"] >= 0
    result = {"load": load.__dict__, "rows": [row]}
    table = serving_table(result)
    assert "| source | auto | vllm |" in table and "(1.00x)" in table
    serving_plot(result, tmp_path / "serving.png")
    from matplotlib.image import imread

    assert imread(tmp_path / "serving.png").shape[:2] == (504, 1440)
