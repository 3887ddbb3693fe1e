"""Quality of SmolLM2-135M conversions: perplexity against KV compression, without and with healing.

    .venv/bin/python bench/quality.py --out runs/quality

Converts at each ratio, heals with the given minute budgets, evaluates every model on the wiki and
news evaluation splits, prints a table and writes results.json, results.md and quality.png.
Finished steps are reused when the script is run again with the same --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tucker_serve.convert import ConvertOptions, convert
from tucker_serve.evaluate import evaluate
from tucker_serve.heal import HealOptions, heal

SOURCE = "smollm2-135m"


def parse_heal(spec: str) -> dict[float, float]:
    """'2=30,3=30' -> {2.0: 30.0, 3.0: 30.0} (ratio -> healing minutes)."""
    return {float(r): float(m) for r, m in (item.split("=") for item in spec.split(",") if item)}


def cached(path: Path, make):
    if path.is_file():
        return json.loads(path.read_text())
    result = make()
    path.write_text(json.dumps(result, indent=2))
    return result


def measure(model: str, out: Path, tag: str, tokens: int) -> dict:
    return {text: cached(out / f"eval-{tag}-{text}.json",
                         lambda text=text: evaluate(model, text, tokens, 1024, progress=False))["perplexity"]
            for text in ("wiki", "news")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    ap.add_argument("--ratios", default="1.5,2,3,4,6")
    ap.add_argument("--heal", default="1.5=10,2=30,3=30,4=10,6=10", help="ratio=minutes,...")
    ap.add_argument("--tokens", type=int, default=16384, help="evaluation tokens per text")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"ratio": 1.0, "variant": "source", **measure(SOURCE, out, "source", args.tokens)}]
    full = out / "full"
    if not full.is_dir():
        convert(SOURCE, full, ConvertOptions(full_rank=True), progress=False)
    rows.append({"ratio": 1.0, "variant": "full rank", **measure(str(full), out, "full", args.tokens)})
    heal_minutes = parse_heal(args.heal)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        folder = out / f"x{ratio:g}"
        if not folder.is_dir():
            start = time.time()
            convert(SOURCE, folder, ConvertOptions(kv_ratio=ratio), progress=False)
            print(f"converted x{ratio:g} in {time.time() - start:.0f} s", flush=True)
        report = json.loads((folder / "tucker_report.json").read_text())
        rows.append({"ratio": ratio, "variant": "converted", "key_rank": report["key_rank"],
                     "value_rank": report["value_rank"], "convert_seconds": report["seconds"],
                     **measure(str(folder), out, f"x{ratio:g}", args.tokens)})
        if ratio in heal_minutes:
            healed = out / f"x{ratio:g}-healed"
            if not healed.is_dir():
                heal(folder, healed, HealOptions(minutes=heal_minutes[ratio]), progress=False)
            h = json.loads((healed / "tucker_report.json").read_text())["healing"]
            rows.append({"ratio": ratio, "variant": "healed", "heal_minutes": h["minutes_done"],
                         "local_steps": h["local_steps"], "kl_steps": h["global_steps"],
                         **measure(str(healed), out, f"x{ratio:g}-healed", args.tokens)})
        print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    (out / "results.md").write_text(table)
    print(table)
    plot(rows, out / "quality.png")


def markdown(rows: list[dict]) -> str:
    src = rows[0]
    lines = ["| KV ratio | model | wiki ppl | vs source | news ppl | vs source | notes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        notes = []
        if "key_rank" in r:
            notes.append(f"r3={r['key_rank']}, rt3={r['value_rank']}, {r['convert_seconds']:.0f} s")
        if "heal_minutes" in r:
            notes.append(f"{r['local_steps']} steps/layer + {r['kl_steps']} KL steps, {r['heal_minutes']:.1f} min")
        lines.append(f"| {r['ratio']:g}x | {r['variant']} | {r['wiki']:.2f} | {100 * (r['wiki'] / src['wiki'] - 1):+.1f}% "
                     f"| {r['news']:.2f} | {100 * (r['news'] / src['news'] - 1):+.1f}% | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, style in (("converted", "o--"), ("healed", "s-")):
        pts = [(r["ratio"], r["wiki"]) for r in rows if r["variant"] == variant]
        if pts:
            ax.plot(*zip(*pts), style, label=f"{variant} (wiki)")
    ax.axhline(rows[0]["wiki"], color="gray", lw=1, label="source (wiki)")
    ax.set_xlabel("KV-cache compression ratio")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: Tucker conversion quality")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
