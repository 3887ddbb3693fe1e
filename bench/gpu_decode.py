"""One-shot GPU check of the Triton paged latent decode kernel (needs CUDA; torch and Triton only).

    python bench/gpu_decode.py --out runs/gpu_decode.json

1. correctness: the kernel (bf16 cache) against PyTorch SDPA in float32 on the same latents;
   exits non-zero when the relative error exceeds --max-rel-error (1e-2);
2. timing at batch 32-128 and context 4k-32k: the kernel over a paged cache (block 16, shuffled
   blocks) vs PyTorch's flash SDPA on the equivalent contiguous MQA problem, and vs a GQA baseline
   (8 KV heads of 128, like Llama-3-8B) on contiguous K/V;
3. achieved bandwidth: bytes of K/V read per call / time, against the card's measured copy bandwidth.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tucker_serve.ops.triton_decode import paged_decode

BLOCK = 16


def timed(fn, repeat: int = 20) -> float:
    """Median milliseconds of fn() on the GPU after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy of 4 GiB (read + write counted)."""
    src = torch.empty(2**31, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), repeat=10)
    return 2 * src.numel() * 2 / ms / 1e6


def paged_cache(batch: int, ctx: int, width: int, dtype):
    blocks = batch * (ctx // BLOCK)
    cache = torch.randn(blocks, 1, BLOCK, width, device="cuda", dtype=dtype)
    table = torch.randperm(blocks, device="cuda").view(batch, ctx // BLOCK).to(torch.int32)
    return cache, table


def check(heads: int, r3: int, rt3: int) -> float:
    cache, table = paged_cache(4, 1024, r3 + rt3, torch.bfloat16)
    q = torch.randn(4, heads, r3, device="cuda", dtype=torch.bfloat16)
    seq = torch.full((4,), 1000, dtype=torch.int32, device="cuda")
    got = paged_decode(q, cache, table, seq, r3**-0.5).float()
    rows = cache[table.long()].flatten(1, 3)[:, :1000].float()  # (B, L, W) in token order
    want = F.scaled_dot_product_attention(q.float()[:, :, None], rows[:, None, :, :r3], rows[:, None, :, r3:],
                                          scale=r3**-0.5)[:, :, 0]
    return ((got - want).abs().max() / want.abs().max()).item()


def run(batch: int, ctx: int, a) -> dict:
    dt = torch.bfloat16
    cache, table = paged_cache(batch, ctx, a.r3 + a.rt3, dt)
    q = torch.randn(batch, a.heads, a.r3, device="cuda", dtype=dt)
    seq = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    triton_ms = timed(lambda: paged_decode(q, cache, table, seq, a.r3**-0.5))
    k = torch.randn(batch, 1, ctx, a.r3, device="cuda", dtype=dt)
    v = torch.randn(batch, 1, ctx, a.rt3, device="cuda", dtype=dt)
    qs = q[:, :, None]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        mqa_ms = timed(lambda: F.scaled_dot_product_attention(qs, k, v, enable_gqa=True))
        kg = torch.randn(batch, a.groups, ctx, a.head_dim, device="cuda", dtype=dt)
        vg = torch.randn_like(kg)
        qg = torch.randn(batch, a.heads, 1, a.head_dim, device="cuda", dtype=dt)
        gqa_ms = timed(lambda: F.scaled_dot_product_attention(qg, kg, vg, enable_gqa=True))
    latent_bytes = batch * ctx * (a.r3 + a.rt3) * 2
    gqa_bytes = batch * ctx * 2 * a.groups * a.head_dim * 2
    return {"batch": batch, "context": ctx, "triton_ms": triton_ms, "sdpa_mqa_ms": mqa_ms, "gqa_ms": gqa_ms,
            "triton_GBps": latent_bytes / triton_ms / 1e6, "gqa_GBps": gqa_bytes / gqa_ms / 1e6,
            "latent_bytes": latent_bytes, "gqa_bytes": gqa_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--r3", type=int, default=256, help="latent key width (Llama-3-8B at 4x: 256)")
    ap.add_argument("--rt3", type=int, default=256)
    ap.add_argument("--groups", type=int, default=8, help="GQA baseline KV heads")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--contexts", default="4096,8192,16384,32768")
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_decode.json"))
    ap.add_argument("--max-rel-error", type=float, default=1e-2, help="fail above this kernel error (bf16)")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    result = {"device": torch.cuda.get_device_name(), "copy_GBps": copy_bandwidth(),
              "max_rel_error_bf16": check(a.heads, a.r3, a.rt3), "args": vars(a) | {"out": str(a.out)}, "runs": []}
    print(f"{result['device']}: copy {result['copy_GBps']:.0f} GB/s; kernel vs SDPA rel. error "
          f"{result['max_rel_error_bf16']:.2e}")
    if not result["max_rel_error_bf16"] <= a.max_rel_error:  # also catches NaN
        raise SystemExit(f"FAILED: kernel error {result['max_rel_error_bf16']:.2e} above {a.max_rel_error:.0e}")
    print(f"{'batch':>6}{'ctx':>7}{'triton ms':>11}{'sdpa-mqa ms':>13}{'gqa ms':>9}{'triton GB/s':>13}{'% copy':>8}")
    for b in (int(x) for x in a.batches.split(",")):
        for c in (int(x) for x in a.contexts.split(",")):
            try:
                r = run(b, c, a)
            except torch.cuda.OutOfMemoryError:
                print(f"{b:>6}{c:>7}  out of memory")
                result["runs"].append({"batch": b, "context": c, "out_of_memory": True})
                torch.cuda.empty_cache()
                continue
            result["runs"].append(r)
            print(f"{b:>6}{c:>7}{r['triton_ms']:>11.3f}{r['sdpa_mqa_ms']:>13.3f}{r['gqa_ms']:>9.3f}"
                  f"{r['triton_GBps']:>13.0f}{100 * r['triton_GBps'] / result['copy_GBps']:>7.0f}%")
            torch.cuda.empty_cache()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    if not any("triton_ms" in r for r in result["runs"]):
        raise SystemExit("FAILED: no timing ran")


if __name__ == "__main__":
    main()
