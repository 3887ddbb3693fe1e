"""`tucker-serve` command line: the composition root that wires the core (`tucker_serve`), the vLLM
server (`tucker_server`) and the benchmarks (`tucker_bench`); one subcommand per job, heavy imports
deferred to the handler."""

from __future__ import annotations

import argparse
import sys

from tucker_serve import cache_layout as cl
from tucker_serve.sources import DEFAULT_MODEL, MODEL_HELP
from tucker_server.launcher import add_arguments as add_serve_arguments

SCHEMES = "mha:H,D | gqa:G,D | mla:RANK[,ROPE_DIM] | tucker:R3,RT3 | tucker-shared:R3"


def parse_scheme(spec: str) -> tuple[str, int]:
    """'gqa:3,64' -> ('gqa:3,64', 384): a cache scheme and its width per token per layer."""
    kind, _, args = spec.partition(":")
    try:
        nums = [int(a) for a in args.split(",")] if args else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad scheme {spec!r}: numbers expected ({SCHEMES})") from None
    widths = {
        ("mha", 2): lambda: cl.mha_kv_width(*nums),
        ("gqa", 2): lambda: cl.gqa_kv_width(*nums),
        ("mla", 1): lambda: cl.mla_kv_width(*nums),
        ("mla", 2): lambda: cl.mla_kv_width(*nums),
        ("tucker", 2): lambda: cl.tucker_kv_width(*nums),
        ("tucker-shared", 1): lambda: cl.tucker_kv_width(nums[0], nums[0], shared_latent=True),
    }
    if (kind, len(nums)) not in widths or min(nums) < 0:
        raise argparse.ArgumentTypeError(f"bad scheme {spec!r}: expected {SCHEMES}")
    return spec, widths[(kind, len(nums))]()


def cmd_memory(args: argparse.Namespace) -> int:
    budget = int(args.budget_gb * 2**30)
    print(f"{'scheme':<20}{'width':>8}{'bytes/token':>14}{'capacity':>12}{'seqs@ctx':>10}")
    for name, width in args.scheme:
        per_token = cl.kv_bytes_per_token(width, args.layers, args.dtype)
        cap = cl.capacity_tokens(budget, width, args.layers, args.dtype, args.block_size)
        seqs = cl.max_concurrency(cap, args.context, args.block_size)
        print(f"{name:<20}{width:>8}{per_token:>14,}{cap:>12,}{seqs:>10.1f}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from tucker_serve.convert import ConvertOptions, convert

    opt = ConvertOptions(
        kv_ratio=args.kv_ratio, key_rank=args.key_rank, value_rank=args.value_rank,
        full_rank=args.full_rank, calib_text=args.calib_text, calib_tokens=args.calib_tokens, dtype=args.dtype,
        key_metric=args.key_metric, value_stat=args.value_stat,
    )
    report = convert(args.model, args.out, opt, progress=not args.quiet)
    bytes_ = report["bytes_per_token"]
    print(f"wrote {args.out}: key rank {report['key_rank']}, value rank {report['value_rank']}, "
          f"{bytes_['converted']:,} B/token vs {bytes_['source']:,} (x{report['compression_ratio']:.2f}) "
          f"in {report['seconds']:.0f} s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    if args.chat:
        from tucker_eval.chat import chat_eval

        result = chat_eval(args.model, args.source, args.max_tokens, args.kv_cache_dtype, progress=not args.json)
        summary = (f"{args.model}: {result['correct']}/{result['questions']} questions answered correctly "
                   f"(source {result['source_correct']}); same answer as the source on "
                   f"{result['same_answer_as_source']:.0%} of {result['prompts']} prompts")
        if "agreement" in result:
            summary += f"; teacher-forced top-1 agreement {result['agreement']:.3f}, KL {result['kl']:.4f}"
    else:
        from tucker_serve.evaluate import evaluate

        result = evaluate(args.model, args.text, args.tokens, args.window, progress=not args.json)
        summary = f"{args.model}: perplexity {result['perplexity']:.3f} on {result['tokens']:,} tokens of {args.text}"
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "answers"}) if args.json else summary)
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    from tucker_serve.heal import HealOptions, heal

    given = {k: getattr(args, k) for k in ("steps", "minutes", "lr", "seq", "batch", "text", "source", "local_steps",
                                           "chat", "chat_prompts", "answer_tokens", "kv_cache_dtype")}
    opt = HealOptions(**{k: v for k, v in given.items() if v is not None})
    h = heal(args.model, args.out, opt, progress=True)["healing"]
    print(f"wrote {args.out}: perplexity {h['perplexity_before']:.3f} -> {h['perplexity_after']:.3f} after "
          f"{h['chat_answer_minutes']:.1f} min of source answers, {h['local_minutes']:.1f} min of per-layer fitting "
          f"and {h['global_steps']} KL steps ({h['minutes_done']:.1f} min in all)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tucker_bench import BenchOptions, run

    given = {"model": args.model, "out": Path(args.out), "serving": args.serving, "resume": args.resume}
    lists = {"kv_ratios": float, "contexts": int, "cache_dtypes": str, "tucker_models": str}
    for name, kind in lists.items():
        if getattr(args, name) is not None:  # "" = none (--kv-ratios "" with --tucker-models: only those)
            given[name] = tuple(kind(x) for x in getattr(args, name).split(",") if x.strip())
    for name in ("kv_cache_gb", "serving_ratio", "dtype", "batch"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    if args.no_chat:
        given["chat"] = False
    if args.compile:
        given["eager"] = False
    opt = BenchOptions.quick(**given) if args.quick else BenchOptions(**given)
    run(opt)
    print((opt.out / "results.md").read_text())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tucker_server.launcher import options_from, run

    return run(options_from(args), args.passthrough)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tucker-serve", description="Tucker-factored KV caches on vLLM")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mem = sub.add_parser("memory", help="KV-cache bytes per token and capacity of cache schemes")
    mem.add_argument("--scheme", type=parse_scheme, action="append", required=True, help=SCHEMES)
    mem.add_argument("--layers", type=int, required=True)
    mem.add_argument("--dtype", default="bfloat16")
    mem.add_argument("--budget-gb", type=float, default=1.0, help="cache budget in GiB")
    mem.add_argument("--context", type=int, default=4096, help="tokens per sequence for concurrency")
    mem.add_argument("--block-size", type=int, default=16)
    mem.set_defaults(func=cmd_memory)

    conv = sub.add_parser("convert", help="convert a Llama-family model to Tucker attention")
    conv.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    conv.add_argument("--out", required=True, help="output folder (written atomically)")
    rank = conv.add_mutually_exclusive_group(required=True)
    rank.add_argument("--kv-ratio", type=float, help="target KV-cache compression against the source")
    rank.add_argument("--full-rank", action="store_true", help="exact conversion (no compression)")
    rank.add_argument("--key-rank", type=int, help="latent key width r3 (with --value-rank)")
    conv.add_argument("--value-rank", type=int, help="latent value width rt3 (with --key-rank)")
    conv.add_argument("--calib-text", default="wiki,chat",
                      help="comma-separated: wiki, news, chat (the source's own answers to healing prompts) or UTF-8 files")
    conv.add_argument("--calib-tokens", type=int, default=16384)
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    conv.add_argument("--key-metric", default="attention", choices=["attention", "query", "plain"],
                      help="key importance: attention-centred and query-weighted (default), query-weighted, or raw")
    conv.add_argument("--value-stat", default="values", choices=["values", "outputs"],
                      help="value directions from the values' Gram matrix (default) or the attention outputs'")
    conv.add_argument("--quiet", action="store_true", help="no progress bars")
    conv.set_defaults(func=cmd_convert)

    ev = sub.add_parser("eval", help="perplexity on real text, or chat fidelity against the source (--chat)")
    ev.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    ev.add_argument("--text", default="wiki", help="wiki, news or a UTF-8 file")
    ev.add_argument("--tokens", type=int, default=16384)
    ev.add_argument("--window", type=int, default=1024)
    ev.add_argument("--chat", action="store_true",
                    help="chat fidelity through vLLM: question set answered correctly, answers equal to the "
                         "source's, teacher-forced agreement and KL on the source's answers")
    ev.add_argument("--source", help="the model to compare with (default: the one recorded at conversion)")
    ev.add_argument("--max-tokens", type=int, default=48, help="answer length for --chat")
    ev.add_argument("--kv-cache-dtype", default="auto", help="vLLM cache dtype for --chat (auto, fp8, ...)")
    ev.add_argument("--out", help="also write the whole result (with every answer) to this JSON file")
    ev.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ev.set_defaults(func=cmd_eval)

    heal = sub.add_parser("heal", help="distil the source into a converted model (attention only)")
    heal.add_argument("--model", required=True, help="a Tucker folder")
    heal.add_argument("--out", required=True)
    budget = heal.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="KL steps after the per-layer phase")
    budget.add_argument("--minutes", type=float, help="wall-clock budget for both phases")
    heal.add_argument("--local-steps", type=int, help="per-layer steps matching attention outputs before the KL phase (default 0 = skip; 60 is a sensible value)")
    heal.add_argument("--lr", type=float, help="peak learning rate (cosine schedule)")
    heal.add_argument("--seq", type=int, help="tokens per training window")
    heal.add_argument("--batch", type=int, help="windows per step")
    heal.add_argument("--text", help="calibration texts, comma-separated (default wiki,news)")
    heal.add_argument("--source", help="source model (default: the one recorded at conversion)")
    heal.add_argument("--chat", type=float,
                      help="share of training windows from the source's own answers to healing prompts "
                           "(default 0.5; 0 = text only, 1 = chats only)")
    heal.add_argument("--chat-prompts", type=int, help="passage prompts besides the written instructions (default 120)")
    heal.add_argument("--answer-tokens", type=int, help="longest source answer per prompt (default 96)")
    heal.add_argument("--kv-cache-dtype", help="the cache the model will be served with: fp8 rounds the latent in "
                                               "training as vLLM's fp8 cache stores it (default auto: no rounding)")
    heal.set_defaults(func=cmd_heal)

    bench = sub.add_parser("bench", help="KV capacity, quality and decode speed: the source and Tucker conversions, "
                                         "each with a 16-bit and an fp8 cache, through vLLM")
    bench.add_argument("--model", default=DEFAULT_MODEL, help="the source model (" + MODEL_HELP + ")")
    bench.add_argument("--kv-ratios", help="conversions to measure, comma-separated, 1 = full rank (default 1.2,1.5,2,3,4; \"\" = none)")
    bench.add_argument("--tucker-models", help="Tucker folders to measure too, comma-separated (e.g. healed ones)")
    bench.add_argument("--cache-dtypes", help="vLLM KV-cache dtypes per model (default auto,fp8; auto = --dtype)")
    bench.add_argument("--dtype", help="weights dtype of every engine (default bfloat16)")
    bench.add_argument("--contexts", help="prompt tokens for decode speed, comma-separated (default 1024,2048)")
    bench.add_argument("--batch", type=int, help="concurrent requests for decode speed (default 8)")
    bench.add_argument("--kv-cache-gb", type=float, help="cache budget for every engine (default 1)")
    bench.add_argument("--no-chat", action="store_true", help="skip the chat-fidelity columns")
    bench.add_argument("--compile", action="store_true", help="engines in vLLM's torch.compile mode (default eager)")
    bench.add_argument("--out", required=True, help="folder for results.json, results.md and plots")
    bench.add_argument("--quick", action="store_true", help="a small grid (minutes), for a smoke run")
    bench.add_argument("--resume", action="store_true",
                       help="keep the rows an interrupted run with the same options measured (out/rows.partial.json)")
    bench.add_argument("--serving", action="store_true",
                       help="also load the HTTP server with vLLM's benchmark client (source vs one ratio)")
    bench.add_argument("--serving-ratio", type=float,
                       help="the Tucker ratio the serving benchmark uses (default 2, else the last of --kv-ratios)")
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser(
        "serve", help="vLLM's OpenAI server with tucker-serve's plugins (default: SmolLM2-135M, Tucker)",
        usage="tucker-serve serve [options] [-- vLLM server options]",
        epilog="Other arguments (before or after --) go to vLLM's server unchanged, e.g. "
               "`tucker-serve serve --kv-ratio 2 -- --enable-prefix-caching --max-num-seqs 64`.")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    return parser


def split_passthrough(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our arguments, and what `serve` hands to vLLM: unknown arguments, then everything after `--`."""
    ours, tail = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args, extra = parser.parse_known_args(ours)
    if args.command != "serve" and (extra or tail):
        parser.error(f"unrecognized arguments: {' '.join(extra + tail)}")
    return args, extra + tail


def main(argv: list[str] | None = None) -> int:
    args, passthrough = split_passthrough(build_parser(), sys.argv[1:] if argv is None else list(argv))
    args.passthrough = passthrough
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"tucker-serve {args.command}: error: {exc}", file=sys.stderr)
        return 2
