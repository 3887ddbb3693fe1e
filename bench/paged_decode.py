"""The TUCKER backend's CPU decode attention alone (`tucker_serve.ops.paged.decode_attention`), timed
per layer at two contexts: does its time grow with the context as its arithmetic does?

    .venv/bin/python bench/paged_decode.py            # batch 8, 9 heads, r3 = rt3 = 160, bfloat16 cache

One thread (as vLLM's CPU worker runs here), random cache rows in 16-token blocks. Besides the
batched call it times one call per request (smaller working set) on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tucker_serve.ops.paged import decode_attention


def timed(f, repeat: int = 20) -> float:
    for _ in range(3):
        f()
    start = time.perf_counter()
    for _ in range(repeat):
        f()
    return (time.perf_counter() - start) / repeat * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--r3", type=int, default=160)
    ap.add_argument("--rt3", type=int, default=160)
    ap.add_argument("--contexts", default="1024,2048")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    B, H, bs = args.batch, args.heads, 16
    for L in (int(c) for c in args.contexts.split(",")):
        nb = L // bs + 1
        cache = torch.randn(B * nb, 1, bs, args.r3 + args.rt3, generator=g).to(torch.bfloat16)
        table = torch.arange(B * nb, dtype=torch.int32).view(B, nb)
        seq = torch.full((B,), L)
        q = torch.randn(B, H, args.r3, generator=g).to(torch.bfloat16)
        batched = lambda: decode_attention(q, cache, table, seq, 0.1, max_len=L)  # noqa: E731
        each = lambda: torch.cat([decode_attention(q[b:b + 1], cache, table[b:b + 1], seq[b:b + 1], 0.1, max_len=L)  # noqa: E731
                                  for b in range(B)])
        macs = B * H * L * (args.r3 + args.rt3)
        row = {"context": L, "batch": B, "ms_batched": timed(batched), "ms_per_request": timed(each),
               "macs": macs, "same_output": bool(torch.allclose(batched(), each(), atol=1e-5))}
        row["gmacs_per_s_batched"] = macs / row["ms_batched"] / 1e6
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
