"""`tucker-serve bench`: the source model and its Tucker conversions, each with a 16-bit and an fp8 KV
cache, measured in one run through real vLLM engines (`engine`). Writes results.json, results.md and PNG
plots (`report`). Serving under load is bench/serving.py (`serving`).

Per row (model x cache dtype): tokens per GiB as vLLM allocates them, compression against the
source's bf16 cache, wiki and news perplexity and chat fidelity (question set, teacher-forced
agreement with the source's answers, answers equal to the source's), pass keys found in long
prompts (`tucker_serve.long_context`, the cases of `tucker-serve eval --long`), all through the
served path, and decode tokens/s at each context relative to the source with the same weights
dtype and a 16-bit cache.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from tucker_serve import cache_dtypes
from tucker_serve import cache_layout as cl
from tucker_serve.options import flag, listing, option
from tucker_serve.sources import DEFAULT_MODEL, MODEL_HELP


@dataclass(frozen=True)
class BenchOptions:
    model: str = option(DEFAULT_MODEL, str, f"the source model ({MODEL_HELP})")
    # 1.2 = what `tucker-serve serve` serves
    kv_ratios: tuple[float, ...] = option((1.2, 1.5, 2.0, 3.0, 4.0), listing(float),
                                          'conversions to measure, comma-separated, 1 = full rank ("" = none)')
    tucker_models: tuple[str, ...] = option((), listing(str), "Tucker folders to measure too, comma-separated "
                                                              "(e.g. healed ones)")
    cache_dtypes: tuple[str, ...] = option(("auto", "fp8"), listing(str), "vLLM KV-cache dtypes per model "
                                                                          "(auto = --dtype)")
    dtype: str = option("bfloat16", str, "weights dtype of every engine")
    contexts: tuple[int, ...] = option((1024, 2048), listing(int), "prompt tokens for decode speed, comma-separated")
    batch: int = option(8, int, "concurrent requests for decode speed")
    new_tokens: int = 48
    kv_cache_gb: float = option(1.0, float, "cache budget in GiB for every engine")
    ppl_tokens: int = 16384
    chat: bool = option(True, flag, "skip the chat-fidelity columns", flag_name="--no-chat")
    long_lengths: tuple[int, ...] = option((1024, 2048, 4096), listing(int), "prompt tokens of the pass-key "
                                                                             'columns, comma-separated ("" = none)')
    long_trials: int = option(4, int, "pass-key cases per haystack (wiki text, filler) and length")
    eager: bool = option(True, flag, "engines in vLLM's torch.compile mode instead of eager mode",
                         flag_name="--compile")
    out: Path = option(Path("runs/bench"), Path, "folder for results.json, results.md and plots", required=True)
    resume: bool = option(False, flag, "keep the rows an interrupted run with the same options measured "
                                       "(out/rows.partial.json)")

    @classmethod
    def quick(cls, **kw) -> "BenchOptions":
        return cls(**{"kv_ratios": (2.0,), "contexts": (256,), "batch": 4, "new_tokens": 16, "kv_cache_gb": 0.25,
                      "ppl_tokens": 2048, "chat": False,
                      "long_lengths": (1024,), "long_trials": 1, **kw})


@dataclass
class Row:
    name: str
    folder: Path
    cache_dtype: str
    source: bool = False
    results: dict = field(default_factory=dict)


def rows(opt: BenchOptions, progress: bool) -> list[Row]:
    """The source model and each Tucker model (conversions cached under out/), each per cache dtype."""
    from tucker_serve.model_cache import at_ratio, tucker_model
    from tucker_serve.sources import resolve

    source = resolve(opt.model)
    if source.is_tucker:
        raise ValueError(f"{opt.model} is already a Tucker checkpoint: bench takes the source model")
    models = [("source", source.folder)]
    for ratio in opt.kv_ratios:
        models.append((f"tucker {ratio:g}x", tucker_model(opt.model, at_ratio(ratio), root=opt.out / "models",
                                                           progress=progress)))
    for spec in opt.tucker_models:
        found = resolve(spec)
        if not found.is_tucker:
            raise ValueError(f"{spec} is not a Tucker folder")
        models.append((f"tucker {found.folder.name}", found.folder))
    return [Row(name, folder, dtype, name == "source") for name, folder in models for dtype in opt.cache_dtypes]


def measure(row: Row, opt: BenchOptions, chat_set, windows: dict, cases: list, bar) -> None:
    """Everything about one row, on one engine."""
    from tucker_bench import engine as e
    from tucker_eval import engine as served
    from tucker_eval.long_context import pass_key_answers
    from tucker_serve import long_context as lc
    from tucker_serve.sources import load_tokenizer

    max_len = max(max(opt.contexts) + opt.new_tokens, 1024, chat_set["longest"] if chat_set else 0,
                  *opt.long_lengths) + 8
    llm = served.start_engine(row.folder, row.name, max_len, opt.kv_cache_gb, opt.dtype, row.cache_dtype, opt.eager)
    tokenizer = load_tokenizer(row.folder)
    vocab = len(tokenizer)
    try:
        tokens, block = e.capacity(llm)
        row.results.update(capacity_tokens=tokens, block_size=block)

        async def run_all():
            r = row.results
            for text, w in windows.items():
                r[f"{text}_perplexity"] = await served.served_perplexity(llm, w)
                bar.update(1)
            if chat_set:
                answers = await served.served_answers(llm, chat_set["prompts"], chat_set["max_tokens"])
                r["chat"] = chat_scores(answers, chat_set)
                r["chat"]["agreement"] = await served.served_agreement(llm, chat_set["pairs"])
                bar.update(1)
            if cases:
                r["long_context"] = lc.retrieval_summary(cases, await pass_key_answers(llm, tokenizer, cases))
                bar.update(1)
            await e.decode_rate(llm, vocab, 1, 16, 4, seed=0)  # warm-up
            r["decode"] = []
            for ctx in opt.contexts:
                r["decode"].append(await e.decode_rate(llm, vocab, opt.batch, ctx, opt.new_tokens, seed=ctx))
                bar.update(1)

        asyncio.run(run_all())
    finally:
        llm.shutdown()


def chat_scores(answers: list[list[int]], chat_set: dict) -> dict:
    from tucker_serve import chat

    n = chat_set["questions"]
    text = [chat_set["tokenizer"].decode(a, skip_special_tokens=True) for a in answers[:n]]
    return {"questions": n, "correct": sum(chat.correct(text)),
            "same_answer_as_source": sum(a == b for a, b in zip(answers, chat_set["reference"])) / len(answers)}


def chat_set_of(opt: BenchOptions) -> dict | None:
    """The evaluation prompts and the source's own answers (float32, cached), shared by every row."""
    if not opt.chat:
        return None
    from tucker_eval.chat import source_answers
    from tucker_serve import chat
    from tucker_serve.prompts import QUESTIONS
    from tucker_serve.sources import load_tokenizer, resolve

    source = resolve(opt.model)
    tokenizer = load_tokenizer(source.folder)
    prompts = [chat.chat_ids(tokenizer, p) for p in chat.eval_prompts()]
    reference = source_answers(source, prompts, 48)
    return {"prompts": prompts, "reference": reference, "pairs": list(zip(prompts, reference)), "max_tokens": 48,
            "questions": len(QUESTIONS), "tokenizer": tokenizer,
            "longest": max(len(p) + len(a) for p, a in zip(prompts, reference))}


def text_windows_of(opt: BenchOptions) -> dict[str, list[list[int]]]:
    from tucker_serve.evaluate import text_windows
    from tucker_serve.sources import load_tokenizer, resolve
    from tucker_serve.text import load_text

    tokenizer = load_tokenizer(resolve(opt.model).folder)
    return {text: text_windows(tokenizer, load_text(text, "eval"), opt.ppl_tokens, 1024).tolist()
            for text in ("wiki", "news")}


def long_cases_of(opt: BenchOptions) -> list:
    """The pass-key cases every row answers (none without lengths or without a chat template)."""
    from tucker_serve import long_context as lc
    from tucker_serve.chat import can_chat
    from tucker_serve.checkpoint import read_config
    from tucker_serve.sources import load_tokenizer, resolve

    source = resolve(opt.model)
    limit = read_config(source.folder).get("max_position_embeddings")
    if limit and max(opt.long_lengths, default=0) > limit:
        raise ValueError(f"pass-key lengths {list(opt.long_lengths)} exceed {opt.model}'s context of {limit} tokens")
    tokenizer = load_tokenizer(source.folder)
    if not opt.long_lengths or not can_chat(tokenizer, source.folder.name, "no pass-key columns"):
        return []
    return lc.retrieval_cases(tokenizer, opt.long_lengths, opt.long_trials)


class Partial:
    """Rows measured so far, in out/rows.partial.json after each row, so that a crash loses at most
    one row. With `resume`, rows measured earlier with the same options are read back instead of
    measured again (their speeds then come from another run than the rest)."""

    KEEP = ("model", "cache_dtypes", "dtype", "contexts", "batch", "new_tokens", "kv_cache_gb", "ppl_tokens",
            "chat", "long_lengths", "long_trials", "eager")

    def __init__(self, opt: BenchOptions) -> None:
        self.path = opt.out / "rows.partial.json"
        self.options = json.loads(json.dumps({k: getattr(opt, k) for k in self.KEEP}))
        saved = json.loads(self.path.read_text()) if opt.resume and self.path.is_file() else {}
        self.rows = saved.get("rows", {}) if saved.get("options") == self.options else {}

    @staticmethod
    def key(row: Row) -> str:
        return f"{row.name} | {row.cache_dtype} | {row.folder.resolve()}"

    def restore(self, row: Row) -> bool:
        if self.key(row) not in self.rows:
            return False
        row.results = {**self.rows[self.key(row)], "resumed": True}
        return True

    def save(self, row: Row) -> None:
        self.rows[self.key(row)] = row.results
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"options": self.options, "rows": self.rows}, indent=1))
        tmp.replace(self.path)


def run(opt: BenchOptions, progress: bool = True) -> dict:
    from tucker_bench.report import plots, tables

    if not opt.cache_dtypes or not opt.contexts:
        raise ValueError("bench needs at least one cache dtype and one context")
    opt.out.mkdir(parents=True, exist_ok=True)
    found = rows(opt, progress)
    chat_set, windows, cases = chat_set_of(opt), text_windows_of(opt), long_cases_of(opt)
    steps = len(windows) + bool(chat_set) + bool(cases) + len(opt.contexts)
    partial = Partial(opt)
    with tqdm(total=steps * len(found), desc="bench", unit="step", disable=not progress) as bar:
        for row in found:
            bar.set_postfix(row=f"{row.name} {row.cache_dtype}")
            if partial.restore(row):
                bar.update(steps)
                continue
            measure(row, opt, chat_set, windows, cases, bar)
            partial.save(row)
    result = summarize(found, opt)
    (opt.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (opt.out / "results.md").write_text(tables(result))
    plots(result, opt.out)
    return result


def summarize(found: list[Row], opt: BenchOptions) -> dict:
    """Rows with their byte figures (from the formula module) and speeds relative to the source."""
    bf16_source = cl.model_layout(json.loads((found[0].folder / "config.json").read_text()), "bfloat16")
    base = next(r for r in found if r.source and r.cache_dtype == "auto").results["decode"]
    out = []
    for r in found:
        dtype = cache_dtypes.resolve(r.cache_dtype, opt.dtype)
        layout = cl.model_layout(json.loads((r.folder / "config.json").read_text()), dtype)
        decode = [{**d, "speed_vs_source": d["tokens_per_s"] / b["tokens_per_s"]}
                  for d, b in zip(r.results["decode"], base)]
        out.append({
            "variant": r.name, "cache_dtype": dtype, "kv_width": layout.width,
            "bytes_per_token": layout.bytes_per_token,
            "compression_vs_source_bf16": bf16_source.bytes_per_token / layout.bytes_per_token,
            "tokens_per_gib": r.results["capacity_tokens"] / opt.kv_cache_gb, **r.results, "decode": decode,
        })
    return {"options": {k: str(x) if isinstance(x, Path) else x for k, x in asdict(opt).items()},
            "weights_dtype": opt.dtype, "rows": out}
