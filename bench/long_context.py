"""Long-context quality of a source model and its Tucker conversions, side by side with vLLM's own
caches: `tucker-serve eval --long` on each row, one after the other, in one run.

    .venv/bin/python bench/long_context.py --out docs/bench/long_context

A row is MODEL/CACHE: `source` or a ratio (`full` = full rank, `1.5@measured`: latent widths per
layer by measurement; `1.2+calib_window=512`: any convert option; conversions cached as `serve`
caches them) or a model folder (`runs/x1.5-healed/auto`: a healed conversion, named by its path)
served with vLLM's cache dtype CACHE (auto or fp8). Every row gets the same prompts: a
pass key at evenly spaced depths of wiki text and of filler at each length, and perplexity by
position over long wiki windows. Finished rows are kept under --out (rows/*.json) and not measured again;
results.json holds every number and answer of results.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tucker_eval.long_context import long_context_eval
from tucker_serve.long_context import LENGTHS
from tucker_serve.model_cache import row_folder, row_spec
from tucker_serve.options import listing
from tucker_serve.sources import DEFAULT_MODEL

ROWS = ("source/auto", "source/fp8", "full/auto", "1.2/auto", "1.2/fp8", "1.5/auto", "2/auto")


def table(rows: list[dict]) -> str:
    lengths = rows[0]["lengths"]
    hays = list(rows[0]["retrieval"]["by_haystack"])
    buckets = [f"{b['from']}-{b['to']}" for b in rows[0]["position_perplexity"]["buckets"]]
    head = ["model", "cache"] + [f"{h} {n}" for h in hays for n in lengths] + ["found"] + [f"ppl {b}" for b in buckets]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["row_model"], r["kv_cache_dtype"]]
        cells += [f"{r['retrieval']['by_haystack'][h][str(n)]['found']}/{r['retrieval']['by_haystack'][h][str(n)]['trials']}"
                  for h in hays for n in lengths]
        cells.append(f"{r['retrieval']['found']}/{r['retrieval']['cases']}")
        cells += [f"{b['perplexity']:.2f}" for b in r["position_perplexity"]["buckets"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEFAULT_MODEL)
    parser.add_argument("--rows", type=listing(str), default=ROWS, help="MODEL/CACHE rows, comma-separated")
    parser.add_argument("--lengths", type=listing(int), default=LENGTHS)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--windows", type=int, default=2, help="long windows for perplexity by position")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    rows, start = [], time.time()
    for spec in args.rows:
        model, cache = row_spec(spec)
        saved = out / "rows" / f"{model.replace('/', '_')}-{cache}.json"
        if saved.is_file():
            rows.append(json.loads(saved.read_text()))
            continue
        row = long_context_eval(str(row_folder(args.source, model)), cache, args.lengths, args.trials, windows=args.windows)
        row["row_model"] = model
        saved.write_text(json.dumps(row, indent=2))
        rows.append(row)
        print(f"{spec}: found {row['retrieval']['found']}/{row['retrieval']['cases']} in {row['seconds']:.0f} s",
              flush=True)
    result = {"source": args.source, "lengths": list(args.lengths), "trials": args.trials,
              "command": "bench/long_context.py", "seconds": round(time.time() - start), "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
