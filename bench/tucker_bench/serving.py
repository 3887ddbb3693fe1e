"""Serving benchmark: concurrent streaming clients against `tucker-serve serve` on 127.0.0.1.

For the source model and one Tucker variant, each behind its own server with the same small KV
cache: time to first token, time per output token and request throughput at rising concurrency,
and the largest concurrency served without a preemption. Bounded: every level sends at most 64
requests, each with a 300 s timeout, to loopback only.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys
import time

import httpx

LEVELS = (1, 4, 16, 32, 64)
PROMPT_TOKENS, OUTPUT_TOKENS, SERVING_CACHE_GB = 512, 32, 0.25


def start_server(folder, port: int, log_path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tucker_serve.cli", "serve", "--model", str(folder), "--port", str(port),
           "--kv-cache-gb", str(SERVING_CACHE_GB), "--max-model-len", str(PROMPT_TOKENS + OUTPUT_TOKENS + 8),
           "--served-model-name", "bench", "--max-num-seqs", str(max(LEVELS))]
    return subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


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


def preemptions(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("tucker_preemptions_total "):
            return float(line.split()[1])
    return 0.0


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int]) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "temperature": 0.0,
            "stream": True, "logprobs": 0}
    start, stamps = time.perf_counter(), []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                for choice in event["choices"]:
                    n = len(choice["logprobs"]["tokens"]) if choice.get("logprobs") else 0
                    stamps += [time.perf_counter()] * n
    ok = r.status_code == 200 and len(stamps) > 0
    return {"ok": ok, "ttft": stamps[0] - start if ok else None,
            "tpot": (stamps[-1] - stamps[0]) / (len(stamps) - 1) if ok and len(stamps) > 1 else None}


async def level(url: str, concurrency: int, vocab: int, seed: int) -> dict:
    rng = random.Random(seed)
    count = min(64, 2 * concurrency)
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(PROMPT_TOKENS)] for _ in range(count)]
    gate = asyncio.Semaphore(concurrency)
    before = preemptions(url)

    async def bounded(client, prompt):
        async with gate:
            return await one_request(client, url, prompt)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as client:
        results = await asyncio.gather(*(bounded(client, p) for p in prompts))
    wall = time.perf_counter() - start
    good = [r for r in results if r["ok"]]
    return {"concurrency": concurrency, "requests": count, "failed": count - len(good),
            "requests_per_s": len(good) / wall,
            "ttft_ms_median": 1000 * statistics.median(r["ttft"] for r in good) if good else None,
            "tpot_ms_median": 1000 * statistics.median(r["tpot"] for r in good if r["tpot"]) if good else None,
            "preemptions": preemptions(url) - before}


def serving_benchmark(source, tucker, opt) -> dict:
    """Run the load levels against a server for each of the two variants, one after the other."""
    from tucker_serve.sources import load_tokenizer

    out = {"prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS, "kv_cache_gb": SERVING_CACHE_GB,
           "variants": []}
    for variant in (source, tucker):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(variant.folder, port, opt.out / f"server-{variant.name.replace(' ', '-')}.log")
        try:
            wait_for_http(f"{url}/health", proc, timeout=600)
            memory = httpx.get(f"{url}/v1/memory", timeout=10).json()
            vocab = len(load_tokenizer(variant.folder))
            levels = [asyncio.run(level(url, c, vocab, seed=c)) for c in LEVELS]
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        clean = [lv["concurrency"] for lv in levels if lv["preemptions"] == 0 and lv["failed"] == 0]
        out["variants"].append({"variant": variant.name, "capacity_tokens": memory["capacity_tokens"],
                                "levels": levels, "max_concurrency_without_preemption": max(clean, default=0)})
    return out


def serving_table(result: dict) -> str:
    lines = [f"Serving ({result['prompt_tokens']}-token prompts, {result['output_tokens']} output tokens, "
             f"{result['kv_cache_gb']} GiB KV cache, streaming over HTTP on 127.0.0.1):", "",
             "| variant | concurrency | req/s | TTFT ms (median) | TPOT ms (median) | preemptions | failed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in result["variants"]:
        for lv in v["levels"]:
            lines.append(f"| {v['variant']} | {lv['concurrency']} | {lv['requests_per_s']:.2f} "
                         f"| {lv['ttft_ms_median']:.0f} | {lv['tpot_ms_median']:.1f} | {lv['preemptions']:.0f} "
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
