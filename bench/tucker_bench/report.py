"""Tables and plots of a `tucker-serve bench` result (results.json -> results.md, frontier.png)."""

from __future__ import annotations

from pathlib import Path


def tables(result: dict) -> str:
    rows, opt = result["rows"], result["options"]
    contexts = [d["context"] for d in rows[0]["decode"]]
    chat = "chat" in rows[0]
    lengths = list(rows[0]["long_context"]["by_haystack"]["wiki"]) if "long_context" in rows[0] else []
    head = ["model", "KV cache", "bytes/token", "tokens per GiB", "vs source bf16 cache", "wiki ppl", "news ppl"]
    head += ["questions correct", "top-1 agreement", "same answer"] if chat else []
    head += [f"pass keys {n}" for n in lengths]
    head += [f"decode tok/s ctx {c} (vs source)" for c in contexts]
    out = [f"Weights {result['weights_dtype']}; {opt['kv_cache_gb']} GiB of KV cache per engine; decode at batch "
           f"{opt['batch']}, {opt['new_tokens']} new tokens; every figure through vLLM (prompt log-probs for "
           "perplexity, greedy answers for chat and pass keys: found / cases, wiki text and filler haystacks).",
           "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["variant"], r["cache_dtype"], f"{r['bytes_per_token']:,}", f"{r['tokens_per_gib']:,.0f}",
                 f"{r['compression_vs_source_bf16']:.2f}x", f"{r['wiki_perplexity']:.2f}", f"{r['news_perplexity']:.2f}"]
        if chat:
            c = r["chat"]
            cells += [f"{c['correct']}/{c['questions']}", f"{c['agreement']:.3f}", f"{c['same_answer_as_source']:.0%}"]
        for n in lengths:
            found = [h[n] for h in r["long_context"]["by_haystack"].values()]
            cells.append(f"{sum(f['found'] for f in found)}/{sum(f['trials'] for f in found)}")
        cells += [f"{d['tokens_per_s']:.1f} ({d['speed_vs_source']:.2f})" for d in r["decode"]]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plots(result: dict, out: Path) -> None:
    """frontier.png: quality against KV bytes per token, one point per row (vLLM's fp8 cache on the
    source among them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    panels = [("wiki_perplexity", "wiki perplexity (lower is better)")]
    if "chat" in rows[0]:
        panels.append(("agreement", "top-1 agreement with the source's answers"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for r in rows:
            y = r["chat"][key] if key == "agreement" else r[key]
            marker = "^" if r["cache_dtype"].startswith("fp8") else "o"
            color = "black" if r["variant"] == "source" else None
            ax.plot(r["bytes_per_token"], y, marker, color=color, markersize=8)
            ax.annotate(f"{r['variant']} {r['cache_dtype']}", (r["bytes_per_token"], y), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        ax.set(xscale="log", xlabel="KV-cache bytes per token (all layers)", ylabel=label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Quality against KV memory ({result['weights_dtype']} weights)\ntriangles: fp8 cache; "
                 "black: the source under vLLM's own attention", fontsize=9)  # two lines: fits one panel
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
