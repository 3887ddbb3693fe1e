"""`tucker-serve` command line: one subcommand per job, heavy imports deferred to the handler."""

from __future__ import annotations

import argparse
import sys

from tucker_serve import cache_layout as cl

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


def cmd_serve(args: argparse.Namespace) -> int:
    print("tucker-serve serve: the HTTP server is not built yet (see the server issue).", file=sys.stderr)
    return 2


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

    serve = sub.add_parser("serve", help="serve a model over the OpenAI API")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"tucker-serve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
