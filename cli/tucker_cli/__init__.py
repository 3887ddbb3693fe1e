"""`tucker-serve` command line: the composition root that wires the core (`tucker_serve`), the vLLM
server (`tucker_server`) and the benchmarks (`tucker_bench`); one subcommand per job, heavy imports
deferred to the handler."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tucker_serve import cache_layout as cl
from tucker_serve.options import add_arguments, given_options, options_from
from tucker_serve.sources import DEFAULT_MODEL, MODEL_HELP
from tucker_server.launcher import add_arguments as add_serve_arguments

SCHEMES = "mha:H,D | gqa:G,D | mla:RANK[,ROPE_DIM] | tucker:R3,RT3 | tucker-shared:R3"


class Subcommand(argparse.ArgumentParser):
    """A subcommand's parser. `options` ("module:Class") names the dataclass that declares the job's
    options; its flags are added when this subcommand is parsed or its help shown, so that the job's
    module (torch) is imported only then: `tucker-serve memory` and `tucker-serve --help` stay light."""

    def __init__(self, *args, options: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.options = options

    def declare(self) -> "Subcommand":
        if self.options:
            module, _, name = self.options.partition(":")
            self.options = None
            add_arguments(self, getattr(importlib.import_module(module), name))
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.declare()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.declare()
        return super().format_help()


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

    report = convert(args.model, args.out, options_from(args, ConvertOptions), progress=not args.quiet,
                     device=args.device)
    bytes_ = report["bytes_per_token"]
    ranks = lambda r: f"{min(r)}-{max(r)} by layer" if isinstance(r, list) else r  # noqa: E731
    print(f"wrote {args.out}: key rank {ranks(report['key_rank'])}, value rank {ranks(report['value_rank'])}, "
          f"{bytes_['converted']:,} B/token vs {bytes_['source']:,} (x{report['compression_ratio']:.2f}) "
          f"in {report['seconds']:.0f} s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from tucker_serve.evaluate import EvalOptions

    opt = options_from(args, EvalOptions)
    if opt.chat and opt.long:
        raise ValueError("--chat and --long are two evaluations: run one at a time")
    if opt.long:
        from tucker_eval.long_context import long_context_eval

        result = long_context_eval(args.model, opt.kv_cache_dtype, opt.lengths, opt.trials, progress=not args.json)
        cells = [f"{hay} {n}: {c['found']}/{c['trials']}" for hay, row in result["retrieval"]["by_haystack"].items()
                 for n, c in row.items()]
        buckets = ", ".join(f"{b['from']}-{b['to']}: {b['perplexity']:.2f}"
                            for b in result["position_perplexity"]["buckets"])
        summary = (f"{args.model}: pass key found {result['retrieval']['found']}/{result['retrieval']['cases']} "
                   f"({'; '.join(cells)}); perplexity by position {buckets}")
    elif opt.chat:
        from tucker_eval.chat import chat_eval

        result = chat_eval(args.model, opt.source, opt.max_tokens, opt.kv_cache_dtype, progress=not args.json,
                           device=opt.device)
        summary = (f"{args.model}: {result['correct']}/{result['questions']} questions answered correctly "
                   f"(source {result['source_correct']}); same answer as the source on "
                   f"{result['same_answer_as_source']:.0%} of {result['prompts']} prompts")
        if "agreement" in result:
            summary += f"; teacher-forced top-1 agreement {result['agreement']:.3f}, KL {result['kl']:.4f}"
    else:
        from tucker_serve.evaluate import evaluate

        result = evaluate(args.model, opt.text, opt.tokens, opt.window, progress=not args.json,
                          device=opt.device)
        summary = f"{args.model}: perplexity {result['perplexity']:.3f} on {result['tokens']:,} tokens of {opt.text}"
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "answers"}) if args.json else summary)
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    from tucker_serve.heal import HealOptions, heal

    h = heal(args.model, args.out, options_from(args, HealOptions), progress=True, device=args.device)["healing"]
    if h["processes"] > 1 and os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun rank 0 writes and reports
    print(f"wrote {args.out}: perplexity {h['perplexity_before']:.3f} -> {h['perplexity_after']:.3f} after "
          f"{h['chat_answer_minutes']:.1f} min of source answers, {h['local_minutes']:.1f} min of per-layer fitting "
          f"and {h['global_steps']} KL steps ({h['minutes_done']:.1f} min in all)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tucker_bench import BenchOptions, run

    given = given_options(args, BenchOptions)  # --kv-ratios "" with --tucker-models: only those
    opt = BenchOptions.quick(**given) if args.quick else BenchOptions(**given)
    run(opt)
    print((opt.out / "results.md").read_text())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tucker_server.launcher import options_from, run

    return run(options_from(args), args.passthrough)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tucker-serve", description="Tucker-factored KV caches on vLLM")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Subcommand)

    mem = sub.add_parser("memory", help="KV-cache bytes per token and capacity of cache schemes")
    mem.add_argument("--scheme", type=parse_scheme, action="append", required=True, help=SCHEMES)
    mem.add_argument("--layers", type=int, required=True)
    mem.add_argument("--dtype", default="bfloat16")
    mem.add_argument("--budget-gb", type=float, default=1.0, help="cache budget in GiB")
    mem.add_argument("--context", type=int, default=4096, help="tokens per sequence for concurrency")
    mem.add_argument("--block-size", type=int, default=16)
    mem.set_defaults(func=cmd_memory)

    conv = sub.add_parser("convert", help="convert a Llama-family model to Tucker attention",
                          options="tucker_serve.convert:ConvertOptions")
    conv.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default {DEFAULT_MODEL})")
    conv.add_argument("--out", required=True, help="output folder (written atomically)")
    conv.add_argument("--quiet", action="store_true", help="no progress bars")
    conv.add_argument("--device", default="auto", help="where the source runs for calibration and measured widths: "
                                                       "auto, cuda, cuda:N or cpu (default: auto, CUDA when present)")
    conv.set_defaults(func=cmd_convert)

    ev = sub.add_parser("eval", help="perplexity on real text, chat fidelity against the source (--chat) or "
                                     "long-context quality (--long)",
                        options="tucker_serve.evaluate:EvalOptions")
    ev.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default {DEFAULT_MODEL})")
    ev.add_argument("--out", help="also write the whole result (with every answer) to this JSON file")
    ev.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ev.set_defaults(func=cmd_eval)

    heal = sub.add_parser("heal", help="distil the source into a converted model (attention only)",
                          options="tucker_serve.heal:HealOptions")
    heal.add_argument("--model", required=True, help="a Tucker folder")
    heal.add_argument("--out", required=True, help="output folder")
    heal.add_argument("--device", default="auto", help="where healing runs: auto, cuda, cuda:N or cpu (default: "
                                                       "auto, CUDA when present; under torchrun each rank's GPU)")
    heal.set_defaults(func=cmd_heal)

    bench = sub.add_parser("bench", help="KV capacity, quality and decode speed: the source and Tucker conversions, "
                                         "each with a 16-bit and an fp8 cache, through vLLM",
                           options="tucker_bench:BenchOptions")
    bench.add_argument("--quick", action="store_true", help="a small grid (minutes), for a smoke run")
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
