"""Serving where the KV cache is the limit, under vLLM's own benchmark client.

The source under vLLM's own server and the Tucker conversions under `tucker-serve serve`, each with
a bf16 and an fp8 cache of the same small size, one server after the other, in one run.

    .venv/bin/python bench/serving.py --out docs/bench/serving

A row is MODEL/CACHE as in bench/long_context.py: `source` or a ratio (`2`, `1.5@measured`, any
convert option after `+`), with vLLM's cache dtype CACHE (auto = the weights' dtype, or fp8). Every
row gets the same requests (vLLM's random dataset, fixed seed, --ignore-eos) with more concurrent
clients than the source's bf16 cache holds at once. Finished rows are kept under --out
(rows/*.json) and not measured again; results.json holds every figure of results.md and
serving.png, including vLLM's running and waiting requests sampled every half second.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields
from pathlib import Path

from tucker_bench.serving import Load, serve_row, serving_plot, serving_table
from tucker_serve.model_cache import row_folder, row_spec
from tucker_serve.options import listing
from tucker_serve.sources import DEFAULT_MODEL

ROWS = ("source/auto", "source/fp8", "1.2/auto", "1.2/fp8", "2/auto", "2/fp8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEFAULT_MODEL)
    parser.add_argument("--rows", type=listing(str), default=ROWS, help="MODEL/CACHE rows, comma-separated")
    for f in fields(Load):
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if f.type in (bool, "bool") else type(f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default,
                            help=f"(default {f.default})")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    load = Load(**{f.name: getattr(args, f.name) for f in fields(Load)})
    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    rows, start = [], time.time()
    for spec in args.rows:
        model, cache = row_spec(spec)
        saved = out / "rows" / f"{model.replace('/', '_')}-{cache}.json"
        if saved.is_file() and json.loads(saved.read_text())["load"] == asdict(load):
            rows.append(json.loads(saved.read_text())["row"])
            continue
        name = "source" if model == "source" else f"tucker {model}x"
        row = serve_row(name, row_folder(args.source, model, progress=True), model == "source", cache, load, out)
        saved.write_text(json.dumps({"load": asdict(load), "row": row}, indent=2))
        rows.append(row)
        print(f"{spec}: {row['request_throughput']:.3f} req/s, {row['running']['mean']:.1f} running on average, "
              f"{row['preemptions']:.0f} preemptions", flush=True)
    result = {"source": args.source, "load": asdict(load), "command": "bench/serving.py",
              "seconds": round(time.time() - start), "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(serving_table(result))
    serving_plot(result, out / "serving.png")
    print(serving_table(result))


if __name__ == "__main__":
    main()
