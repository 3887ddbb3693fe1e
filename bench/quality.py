"""Quality of a source's conversions (SmolLM2-135M unless --source): perplexity and chat fidelity
against KV compression, calibration text and healing, each row measured the same way.

    .venv/bin/python bench/quality.py --out runs/quality --variants 1.5/wiki/-,1.5/wiki+chat/10/0.5
    .venv/bin/python bench/quality.py --source qwen2.5-coder-0.5b --out runs/qwen --variants 2/wiki+chat/-

A variant is RATIO/CALIB/HEAL_MINUTES[/CHAT_SHARE[/LOCAL_SHARE]]: convert at RATIO (`full` = full
rank; `2@measured`: latent widths per layer chosen by measurement, `--layer-widths measured`)
calibrated on CALIB (`+`-separated: wiki, news, chat), then heal for HEAL_MINUTES (`-`: not
healed) with that share of chat windows (default 0.5), the per-layer phase taking at most
LOCAL_SHARE of the budget (default 0.35; 0 skips it). Every model gets wiki and news perplexity (16,368 tokens each)
and `tucker-serve eval --chat` (question set correct, teacher-forced agreement and KL, answers equal
to the source's). Finished steps are cached under --out; results.json holds every number of
results.md and quality.png; chat-<model>.json every answer.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tucker_serve.evaluate import evaluate
from tucker_serve.heal import HealOptions, heal
from tucker_serve.model_cache import at_spec, tucker_model

DEFAULT_SOURCE = "smollm2-135m"


@dataclass(frozen=True)
class Variant:
    ratio: str  # "1.5", "2@measured" or "full"
    calib: str  # "wiki+chat"
    heal_minutes: float | None
    chat_share: float = 0.5
    local_share: float = 0.35
    teacher_windows: int = HealOptions.teacher_windows  # set by --teacher-windows, for every heal of a run

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        parts = spec.split("/")
        if len(parts) not in (3, 4, 5):
            raise ValueError(f"variant {spec!r}: expected RATIO/CALIB/HEAL_MINUTES[/CHAT_SHARE[/LOCAL_SHARE]]")
        minutes = None if parts[2] == "-" else float(parts[2])
        return cls(parts[0], parts[1], minutes, *(float(p) for p in parts[3:]))

    @property
    def converted(self) -> str:
        return f"x{self.ratio}-{self.calib}"

    @property
    def name(self) -> str:
        if self.heal_minutes is None:
            return self.converted
        local = "" if self.local_share == 0.35 else f"-local{self.local_share:g}"
        pool = f"-pool{self.teacher_windows}" if self.teacher_windows else ""  # online: no suffix
        return f"{self.converted}-heal{self.heal_minutes:g}-chat{self.chat_share:g}{local}{pool}"


def cached(path: Path, make):
    if path.is_file():
        return json.loads(path.read_text())
    result = make()
    path.write_text(json.dumps(result, indent=2))
    return result


def measure(source: str, model: str, out: Path, name: str, tokens: int) -> dict:
    """Perplexity on both texts and chat fidelity, cached per model."""
    from tucker_eval.chat import chat_eval

    def make():
        row = {text: evaluate(model, text, tokens, 1024, progress=False)["perplexity"] for text in ("wiki", "news")}
        result = chat_eval(model, source, progress=False)
        (out / f"chat-{name}.json").write_text(json.dumps(result, indent=2))
        row["chat"] = {k: v for k, v in result.items() if k != "answers"}
        return row

    return cached(out / f"eval-{name}.json", make)


def build(source: str, v: Variant, out: Path) -> tuple[Path, dict]:
    """The variant's folder (converted, then healed), with what making it cost."""
    folder = tucker_model(source, replace(at_spec(v.ratio), calib_text=v.calib.replace("+", ",")),
                          root=out / "models", progress=False)
    report = json.loads((folder / "tucker_report.json").read_text())
    info = {"key_rank": report["key_rank"], "value_rank": report["value_rank"], "convert_seconds": report["seconds"]}
    if v.heal_minutes is None:
        return folder, info
    healed = out / v.name
    if not healed.is_dir():
        opt = HealOptions(minutes=v.heal_minutes, chat=v.chat_share, local_share=v.local_share,
                          local_steps=60 if v.local_share else 0, teacher_windows=v.teacher_windows)
        heal(folder, healed, opt, progress=False)
    h = json.loads((healed / "tucker_report.json").read_text())["healing"]
    info.update(heal_minutes=h["minutes_done"], chat_answer_minutes=h.get("chat_answer_minutes", 0),
                local_minutes=h["local_minutes"], kl_steps=h["global_steps"], final_kl=h["final_kl"],
                teacher_minutes=h.get("teacher_minutes", 0.0), teacher_passes=h.get("teacher_passes"))
    return healed, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=DEFAULT_SOURCE, help="the source model (a built-in name or a folder)")
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    ap.add_argument("--variants", required=True, help="RATIO/CALIB/HEAL_MINUTES[/CHAT_SHARE],...")
    ap.add_argument("--tokens", type=int, default=16384, help="evaluation tokens per text")
    ap.add_argument("--teacher-windows", type=int, default=HealOptions.teacher_windows,
                    help="heal with a pool of this many windows of the source's outputs (0: a teacher forward per step)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"variant": "source", "ratio": 1.0, **measure(args.source, args.source, out, "source", args.tokens)}]
    for v in [replace(Variant.parse(s), teacher_windows=args.teacher_windows) for s in args.variants.split(",")]:
        start = time.time()
        folder, info = build(args.source, v, out)
        opt = at_spec(v.ratio)
        rows.append({"variant": v.name, "ratio": opt.kv_ratio or 1.0,
                     "widths": opt.layer_widths + "".join(f"+{o}" for o in v.ratio.split("+")[1:]), "calib": v.calib, "heal": v.heal_minutes,
                     "chat_share": v.chat_share if v.heal_minutes else None,
                     "local_share": v.local_share if v.heal_minutes else None,
                     "teacher_windows": v.teacher_windows if v.heal_minutes else None, **info,
                     **measure(args.source, str(folder), out, v.name, args.tokens)})
        print(json.dumps(rows[-1]), f"({time.time() - start:.0f} s)", flush=True)
    rows = merged(out / "results.json", rows)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    (out / "results.md").write_text(table)
    print(table)
    plot(rows, out / "quality.png", args.source)


def merged(path: Path, rows: list[dict]) -> list[dict]:
    """Rows of earlier runs into the same --out, updated by this run's; source first, then by ratio."""
    known = {r["variant"]: r for r in (json.loads(path.read_text()) if path.is_file() else [])}
    known.update({r["variant"]: r for r in rows})
    order = lambda r: (r["variant"] != "source", r["ratio"], r.get("widths", "uniform"),  # noqa: E731
                       r.get("calib") or "", r.get("heal") or 0,
                       r.get("chat_share") or 0, r.get("local_share") or 0)
    return sorted(known.values(), key=order)


def markdown(rows: list[dict]) -> str:
    src = rows[0]
    lines = ["| KV ratio | widths | calibration | healing | wiki ppl | vs source | news ppl | vs source "
             "| questions correct | top-1 agreement | KL | same answer | notes |", "| --- " * 13 + "|"]
    for r in rows:
        c = r["chat"]
        healing = "-" if not r.get("heal") else (f"{r['heal_minutes']:.1f} min, chat share {r['chat_share']:g}, "
                                                 f"local share {r.get('local_share', 0.35):g}")
        notes = []
        if isinstance(r.get("key_rank"), list):
            notes.append(f"widths per layer by measurement: r3 {min(r['key_rank'])}-{max(r['key_rank'])}, "
                         f"rt3 {min(r['value_rank'])}-{max(r['value_rank'])}")
        elif "key_rank" in r:
            notes.append(f"r3={r['key_rank']}, rt3={r['value_rank']}")
        if r.get("heal"):
            notes.append(f"{r['chat_answer_minutes']:.1f} min answers + {r['local_minutes']:.1f} min local "
                         f"+ {r['kl_steps']} KL steps")
            if r.get("teacher_windows") == 0:
                notes.append("the source run on every step")
            elif r.get("teacher_passes") is not None:
                notes.append(f"{r['teacher_minutes']:.1f} min computing a pool of the source's outputs "
                             f"({r['teacher_windows']} windows), passed {r['teacher_passes']:.1f} times")
        widths = "-" if r["variant"] == "source" else r.get("widths", "uniform")
        lines.append(
            f"| {r['ratio']:g}x | {widths} | {r.get('calib', '-')} | {healing} | {r['wiki']:.2f} "
            f"| {100 * (r['wiki'] / src['wiki'] - 1):+.1f}% | {r['news']:.2f} | {100 * (r['news'] / src['news'] - 1):+.1f}% "
            f"| {c['correct']}/{c['questions']} | {c['agreement']:.3f} | {c['kl']:.3f} | {c['same_answer_as_source']:.0%} "
            f"| {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, source: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows[1:]:
        marker = "s" if r.get("heal") else "o"
        a.plot(r["ratio"], r["wiki"], marker, label=r["variant"])
        b.plot(r["ratio"], r["chat"]["correct"], marker, label=r["variant"])
    a.axhline(rows[0]["wiki"], color="gray", lw=1)
    b.axhline(rows[0]["chat"]["correct"], color="gray", lw=1)
    a.set(xlabel="KV-cache compression ratio", ylabel="wiki perplexity", yscale="log", title="perplexity")
    b.set(xlabel="KV-cache compression ratio", ylabel=f"questions correct (of {rows[0]['chat']['questions']})",
          title="chat answers (grey: source)")
    b.legend(fontsize=6)
    fig.suptitle(f"{source}: Tucker conversions (squares: healed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
