"""Which vLLM server features work with a Tucker model: measured, one request (or start-up) each.

    .venv/bin/python bench/features.py --model runs/x2 --out docs/bench/features

Starts `tucker-serve serve` on the model once per group of server flags, probes each feature with
a real request, and writes features.json and features.md (feature, server flags, result, evidence).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import httpx

from tucker_bench.serving import free_port, scrape, serve_command, server_process

NAME = "tucker"


def chat(url, content, **extra) -> httpx.Response:
    body = {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 24, "temperature": 0,
            **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)


def complete(url, prompt, **extra) -> httpx.Response:
    body = {"model": NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=300)


def metric(url, name) -> float:
    return scrape(url).get(name, 0.0)


def probe_prefix_caching(url):
    prompt = "The history of the Roman Empire spans many centuries and " * 20
    complete(url, prompt)
    before = metric(url, "vllm:prefix_cache_hits_total")
    complete(url, prompt)
    hits = metric(url, "vllm:prefix_cache_hits_total") - before
    return hits > 0, f"{hits:.0f} prompt tokens read from the prefix cache on the repeat"


def probe_chunked_prefill(url):
    r = complete(url, "word " * 300, max_tokens=4)  # 300 tokens > --max-num-batched-tokens 128
    return r.status_code == 200, f"HTTP {r.status_code}, 300-token prompt prefilled in 128-token chunks"


def probe_json_schema(url):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
    r = chat(url, "Which city is the capital of France? Answer in JSON.", max_tokens=40,
             response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
    try:
        ok = "city" in json.loads(text)
    except (ValueError, TypeError):
        ok = False
    return ok, f"HTTP {r.status_code}: {text[:60]!r}"


def probe_choice(url):
    r = chat(url, "Is Paris in France? Answer yes or no.", structured_outputs={"choice": ["yes", "no"]})
    text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
    return text in ("yes", "no"), f"HTTP {r.status_code}: {text[:60]!r}"


def probe_tools(url):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    r = chat(url, "What is the weather in Paris?", tools=[tool], tool_choice="required", max_tokens=60)
    calls = r.json()["choices"][0]["message"].get("tool_calls") if r.status_code == 200 else None
    ok = bool(calls) and calls[0]["function"]["name"] == "get_weather"
    return ok, f"HTTP {r.status_code}: {json.dumps(calls)[:80] if calls else r.text[:80]}"


def probe_beam_search(url):
    r = complete(url, "The capital of France is", use_beam_search=True, n=2)
    return r.status_code == 200 and len(r.json()["choices"]) == 2, f"HTTP {r.status_code}"


def probe_parallel_sampling(url):
    r = complete(url, "Once upon a time", n=3, temperature=1.0, seed=1)
    return r.status_code == 200 and len(r.json()["choices"]) == 3, f"HTTP {r.status_code}"


def probe_prompt_logprobs(url):
    r = complete(url, "The capital of France is", prompt_logprobs=1, max_tokens=1)
    ok = r.status_code == 200 and len(r.json()["choices"][0]["prompt_logprobs"]) == 5
    return ok, f"HTTP {r.status_code}"


def probe_generates(url):
    r = complete(url, "The capital of France is")
    return r.status_code == 200, f"HTTP {r.status_code}: {r.json()['choices'][0]['text']!r}" if r.status_code == 200 \
        else r.text[:100]


# (feature, vLLM server flags, probe); features sharing flags share one server
FEATURES = [
    ("prefix caching", ["--max-num-batched-tokens", "128", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
     probe_prefix_caching),
    ("chunked prefill", None, probe_chunked_prefill),
    ("structured output: json_schema", None, probe_json_schema),
    ("structured output: choice", None, probe_choice),
    ("tool calling (hermes parser, tool_choice=required)", None, probe_tools),
    ("parallel sampling (n=3)", None, probe_parallel_sampling),
    ("beam search", None, probe_beam_search),
    ("prompt logprobs", None, probe_prompt_logprobs),
    ("fp8 KV cache (--kv-cache-dtype fp8)", ["--kv-cache-dtype", "fp8"], probe_generates),
    ("torch.compile (--no-enforce-eager)", ["--no-enforce-eager"], probe_generates),
    ("speculative decoding (ngram)", ["--speculative-config",
                                      '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}'],
     probe_generates),
    ("LoRA adapters (--enable-lora)", ["--enable-lora"], probe_generates),
]


def run_group(model: str, flags: list[str], probes, log: Path) -> list[dict]:
    port, rows = free_port(), []
    cmd = serve_command(model, port, "--served-model-name", NAME, "--kv-cache-gb", "0.5", "--", *flags)
    start = time.time()
    try:
        with server_process(cmd, port, log, timeout=900, stop_timeout=120) as server:
            for feature, probe in probes:
                try:
                    ok, evidence = probe(server["url"])
                except Exception as exc:  # a probe that crashes is a finding, not a script failure
                    ok, evidence = False, f"{type(exc).__name__}: {exc}"[:200]
                rows.append({"feature": feature, "flags": " ".join(flags), "works": ok, "evidence": evidence,
                             "startup_s": round(time.time() - start)})
    except (RuntimeError, TimeoutError):  # the server refused the flags (probes never raise)
        found = re.search(r"\] ((?:Value|Type|NotImplemented|Runtime)Error: .*)", log.read_text())
        error = found.group(1) if found else "no error line in the log"
        return [{"feature": f, "flags": " ".join(flags), "works": False, "evidence": f"server refused: {error[-200:]}"}
                for f, _ in probes]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Tucker folder")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups: list[tuple[list[str], list]] = []
    for feature, flags, probe in FEATURES:
        if flags is None:
            groups[-1][1].append((feature, probe))
        else:
            groups.append((flags, [(feature, probe)]))
    rows = []
    for i, (flags, probes) in enumerate(groups):
        rows += run_group(args.model, flags, probes, out / f"server-{i}.log")
        print(rows[-1], flush=True)
    (out / "features.json").write_text(json.dumps({"model": args.model, "features": rows}, indent=2))
    table = ["| feature | server flags | works | evidence |", "| --- | --- | --- | --- |"]
    table += [f"| {r['feature']} | `{r['flags']}` | {'yes' if r['works'] else 'no'} | {r['evidence']} |".replace(
        "``", "(defaults)") for r in rows]
    (out / "features.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
