"""`tucker-serve bench`: memory, decode speed and quality of the source model and its Tucker
conversions, measured in one run through the real engine (vLLM's AsyncLLM).

Per variant: bytes per token (formula module), the capacity and concurrency vLLM allocates for the
same cache budget, decode throughput and time per output token at each batch size and context
(all requests decoding at once: the window from the last first token to the first finish), and
wiki perplexity. Writes results.json, results.md and PNG plots.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from tucker_serve import cache_layout as cl


@dataclass(frozen=True)
class BenchOptions:
    model: str = "smollm2-135m"
    kv_ratios: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)
    contexts: tuple[int, ...] = (256, 1024, 4096)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    new_tokens: int = 48
    kv_cache_gb: float = 4.0
    ppl_tokens: int = 8192
    out: Path = Path("runs/bench")
    serving: bool = False
    serving_ratio: float = 2.0  # the Tucker variant the serving benchmark compares with the source

    @classmethod
    def quick(cls, **kw) -> "BenchOptions":
        return cls(**{"kv_ratios": (2.0,), "contexts": (128, 512), "batch_sizes": (1, 4), "new_tokens": 16,
                      "kv_cache_gb": 0.5, "ppl_tokens": 2048, **kw})


@dataclass
class Variant:
    name: str
    folder: Path
    ratio: float  # 0 for the source model (its own attention)
    width: int = 0
    source_width: int = 0
    results: dict = field(default_factory=dict)


def variants(opt: BenchOptions, progress: bool) -> list[Variant]:
    """The source model and one Tucker conversion per ratio (converted once, cached under out/)."""
    from tucker_serve.convert import ConvertOptions, convert
    from tucker_serve.sources import resolve

    source = resolve(opt.model)
    if source.is_tucker:
        raise ValueError(f"{opt.model} is already a Tucker checkpoint: bench takes the source model")
    found = [Variant("source", source.folder, 0.0)]
    for ratio in opt.kv_ratios:
        folder = opt.out / "models" / f"x{ratio:g}"
        if not (folder / "model.safetensors").is_file():
            kind = ConvertOptions(full_rank=True) if ratio == 1 else ConvertOptions(kv_ratio=ratio)
            convert(opt.model, folder, kind, progress=progress)
        found.append(Variant(f"tucker {ratio:g}x", folder, ratio))
    return found


async def decode_rate(engine, vocab: int, batch: int, ctx: int, new_tokens: int, seed: int) -> dict:
    """Tokens/s and time per output token while every request of the batch is decoding."""
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(100, vocab - 100, (batch, ctx), generator=g).tolist()  # unique per request
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA, detokenize=False)
    arrivals: list[list[float]] = [[] for _ in range(batch)]
    tag = uuid.uuid4().hex[:8]

    async def one(i: int) -> None:
        async for out in engine.generate(TokensPrompt(prompt_token_ids=prompts[i]), params, f"bench-{tag}-{i}"):
            now = time.perf_counter()
            arrivals[i].extend([now] * len(out.outputs[0].token_ids))

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(batch)))
    all_decoding, first_done = max(a[0] for a in arrivals), min(a[-1] for a in arrivals)
    window = first_done - all_decoding
    tokens = sum(sum(1 for t in a if all_decoding < t <= first_done) for a in arrivals)
    if window <= 0 or tokens == 0:  # batch of one, or a degenerate window: use each request's own decode
        spans = [(a[-1] - a[0], len(a) - 1) for a in arrivals]
        window, tokens = max(s for s, _ in spans), sum(n for _, n in spans)
    return {"batch": batch, "context": ctx, "tokens_per_s": tokens / window,
            "tpot_ms": 1000 * window / (tokens / batch), "wall_s": time.perf_counter() - start}


def start_engine(folder: Path, name: str, max_len: int, kv_cache_gb: float):
    """vLLM's AsyncLLM on a model folder, as `tucker-serve serve` configures it (float32, eager)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from tucker_server.launcher import configure_cpu

    configure_cpu(1)
    args = AsyncEngineArgs(model=str(folder), served_model_name=[name], dtype="float32", max_model_len=max_len,
                           enforce_eager=True, kv_cache_memory_bytes=int(kv_cache_gb * 2**30), seed=0,
                           enable_prefix_caching=False)
    return AsyncLLM.from_engine_args(args)


def measure_engine(variant: Variant, opt: BenchOptions, bar) -> None:
    from tucker_serve.sources import load_tokenizer

    max_len = max(opt.contexts) + opt.new_tokens + 8
    engine = start_engine(variant.folder, variant.name, max_len, opt.kv_cache_gb)
    vocab = len(load_tokenizer(variant.folder))
    try:
        layout = cl.model_layout(json.loads((variant.folder / "config.json").read_text()), "float32")
        variant.width, variant.source_width = layout.width, layout.source_width
        cache = engine.vllm_config.cache_config
        blocks, block = cache.num_gpu_blocks, cache.block_size
        variant.results["capacity_tokens"] = blocks * block
        variant.results["max_concurrency"] = {c: blocks // math.ceil(c / block) for c in opt.contexts}
        variant.results["block_size"] = block

        async def run_all():
            await decode_rate(engine, vocab, 1, 16, 4, seed=0)  # warm-up
            rows = []
            for ctx in opt.contexts:
                for batch in opt.batch_sizes:
                    fits = batch <= variant.results["max_concurrency"][ctx]
                    row = await decode_rate(engine, vocab, batch, ctx, opt.new_tokens, seed=ctx * 1000 + batch)
                    rows.append({**row, "fits_in_cache": fits})
                    bar.update(1)
            return rows

        variant.results["decode"] = asyncio.run(run_all())
    finally:
        engine.shutdown()


def measure_quality(variant: Variant, opt: BenchOptions) -> None:
    from tucker_serve.evaluate import evaluate

    variant.results["wiki_perplexity"] = evaluate(str(variant.folder), "wiki", opt.ppl_tokens, 1024, progress=False)[
        "perplexity"]


def run(opt: BenchOptions, progress: bool = True) -> dict:
    opt.out.mkdir(parents=True, exist_ok=True)
    found = variants(opt, progress)
    cells = len(opt.contexts) * len(opt.batch_sizes)
    with tqdm(total=cells * len(found), desc="decode benchmark", unit="cell", disable=not progress) as bar:
        for v in found:
            measure_engine(v, opt, bar)
    for v in tqdm(found, desc="perplexity", unit="model", disable=not progress):
        measure_quality(v, opt)
    result = summarize(found, opt)
    if opt.serving:
        from tucker_bench.serving import serving_benchmark

        tucker = next((v for v in found if v.ratio == opt.serving_ratio), found[-1])
        result["serving"] = serving_benchmark(found[0], tucker, opt)
    (opt.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (opt.out / "results.md").write_text(tables(result))
    plots(result, opt.out)
    return result


def summarize(found: list[Variant], opt: BenchOptions) -> dict:
    source = found[0]
    rows = []
    for v in found:
        layers = json.loads((v.folder / "config.json").read_text())["num_hidden_layers"]
        ratio = cl.compression_ratio(v.source_width, v.width)
        base = {(d["batch"], d["context"]): d for d in source.results["decode"]}
        decode = [{**d, "speed_vs_source": d["tokens_per_s"] / base[(d["batch"], d["context"])]["tokens_per_s"]}
                  for d in v.results["decode"]]
        rows.append({
            "variant": v.name, "kv_width": v.width, "compression_ratio": ratio,
            "bytes_per_token_per_layer": v.width * cl.dtype_bytes("float32"),
            "bytes_per_token": cl.kv_bytes_per_token(v.width, layers, "float32"),
            "capacity_tokens": v.results["capacity_tokens"],
            "capacity_vs_source": v.results["capacity_tokens"] / source.results["capacity_tokens"],
            "max_concurrency": v.results["max_concurrency"], "wiki_perplexity": v.results["wiki_perplexity"],
            "decode": decode,
        })
    return {"options": {k: str(x) if isinstance(x, Path) else x for k, x in asdict(opt).items()},
            "dtype": "float32", "variants": rows}


def tables(result: dict) -> str:
    v = result["variants"]
    out = ["| variant | KV numbers/token/layer | bytes/token | compression | capacity (tokens) | capacity vs source "
           "| wiki ppl |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in v:
        out.append(f"| {r['variant']} | {r['kv_width']} | {r['bytes_per_token']:,} | {r['compression_ratio']:.2f}x "
                   f"| {r['capacity_tokens']:,} | {r['capacity_vs_source']:.3f}x | {r['wiki_perplexity']:.2f} |")
    contexts = list(v[0]["max_concurrency"])
    out += ["", "Sequences that fit at once (vLLM's blocks):", "",
            "| variant | " + " | ".join(f"ctx {c}" for c in contexts) + " |", "| --- |" + " --- |" * len(contexts)]
    out += [f"| {r['variant']} | " + " | ".join(str(r["max_concurrency"][c]) for c in contexts) + " |" for r in v]
    out += ["", "Decode: generated tokens/s while the whole batch decodes (ratio to source in this run); "
            "TPOT in ms; * = batch does not fit in the cache at once:", "",
            "| variant | batch | context | tokens/s | vs source | TPOT ms |", "| --- | --- | --- | --- | --- | --- |"]
    for r in v:
        for d in r["decode"]:
            mark = "" if d["fits_in_cache"] else " *"
            out.append(f"| {r['variant']} | {d['batch']} | {d['context']} | {d['tokens_per_s']:.1f}{mark} "
                       f"| {d['speed_vs_source']:.2f} | {d['tpot_ms']:.1f} |")
    if "serving" in result:
        from tucker_bench.serving import serving_table

        out += ["", serving_table(result["serving"])]
    return "\n".join(out) + "\n"


def plots(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = result["variants"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["compression_ratio"] for r in v], [r["capacity_tokens"] for r in v], "o-")
    ax.set(xlabel="KV compression ratio", ylabel="capacity (tokens)", title="KV capacity at equal budget")
    fig.tight_layout()
    fig.savefig(out / "capacity.png", dpi=120)
    batches = sorted({d["batch"] for d in v[0]["decode"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for r in v:
            pts = sorted((d["context"], d["tokens_per_s"]) for d in r["decode"] if d["batch"] == b)
            ax.plot(*zip(*pts), "o-", label=r["variant"])
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="decode tokens/s", title=f"batch {b}")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in v:
        ax.plot(r["bytes_per_token"], r["wiki_perplexity"], "o")
        ax.annotate(r["variant"], (r["bytes_per_token"], r["wiki_perplexity"]), fontsize=8)
    ax.set(xlabel="KV bytes per token (float32)", ylabel="wiki perplexity", yscale="log",
           title="quality vs cache size (no healing)")
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=120)
