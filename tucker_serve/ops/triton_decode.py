"""Triton paged decode over the shared latent: each program loads a request's latent blocks once
for all H query heads (the MQA advantage) and keeps an online softmax per head.

Split-KV: a request's blocks are divided among `num_splits` programs whose partial results
(acc, max, sum) are combined afterwards, so few long requests still fill a GPU.
Reference: `tucker_serve.ops.paged.decode_attention`. On CPU the kernel runs under
TRITON_INTERPRET=1 (the tests do this).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: only the GPU path needs it
    triton = None


def available(device: torch.device) -> bool:
    """True when the kernel can run on `device` (a GPU, or the CPU interpreter)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        # Operands are float32 in registers (tiles are loaded in the cache dtype, so bandwidth is
        # unchanged): exact IEEE products for float32 caches, TF32 tensor cores for 16-bit ones.
        # (Triton's CPU interpreter also mishandles bf16 operands of tl.dot.)
        if IEEE:
            return tl.dot(a, b, acc=acc, input_precision="ieee")
        return tl.dot(a, b, acc=acc, input_precision="tf32")

    @triton.jit
    def _decode_split(Q, KV, BT, SEQ, FREQS, ACC, M, L,
                      stride_qb, stride_qh, stride_kvb, stride_kvt, stride_bt,
                      stride_ab, stride_as, stride_ah, stride_mb, stride_ms,
                      scale, H, R3, RT3, V_OFFSET, BLOCK_SIZE, BLOCKS_PER_SPLIT,
                      H_PAD: tl.constexpr, HALF_PAD: tl.constexpr, RT3_PAD: tl.constexpr, BN: tl.constexpr,
                      SHARED: tl.constexpr, IEEE: tl.constexpr):
        b, s = tl.program_id(0), tl.program_id(1)
        seq_len = tl.load(SEQ + b)
        first = s * BLOCKS_PER_SPLIT
        last = tl.minimum(first + BLOCKS_PER_SPLIT, tl.cdiv(seq_len, BLOCK_SIZE))
        half = R3 // 2
        h, r, c, n = tl.arange(0, H_PAD), tl.arange(0, HALF_PAD), tl.arange(0, RT3_PAD), tl.arange(0, BN)
        q_mask = (h[:, None] < H) & (r[None, :] < half)
        q_row = Q + b * stride_qb + h[:, None] * stride_qh
        q1 = tl.load(q_row + r[None, :], mask=q_mask, other=0.0).to(tl.float32)  # rotate-half halves
        q2 = tl.load(q_row + half + r[None, :], mask=q_mask, other=0.0).to(tl.float32)
        freqs = tl.load(FREQS + r, mask=r < half, other=0.0)
        m_i = tl.full([H_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([H_PAD], tl.float32)
        acc = tl.zeros([H_PAD, RT3_PAD], tl.float32)
        for j in range(first, last):
            block = tl.load(BT + b * stride_bt + j).to(tl.int64)
            tok = j * BLOCK_SIZE + n
            valid = (n < BLOCK_SIZE) & (tok < seq_len)
            row = KV + block * stride_kvb + n[:, None] * stride_kvt
            k_mask = valid[:, None] & (r[None, :] < half)
            k1 = tl.load(row + r[None, :], mask=k_mask, other=0.0).to(tl.float32)
            k2 = tl.load(row + half + r[None, :], mask=k_mask, other=0.0).to(tl.float32)
            if SHARED:  # the cache holds unrotated latents: rotate keys by their positions here
                # float64 angles, as the reference: at position 8k a float32 angle is off by ~5e-4 rad
                angle = tok[:, None].to(tl.float64) * freqs[None, :]
                cos, sin = tl.cos(angle).to(tl.float32), tl.sin(angle).to(tl.float32)
                k1, k2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
            scores = _dot(q1, tl.trans(k1), tl.zeros([H_PAD, BN], tl.float32), IEEE)
            scores = _dot(q2, tl.trans(k2), scores, IEEE) * scale  # (H_PAD, BN)
            scores = tl.where(valid[None, :], scores, float("-inf"))
            v = tl.load(row + V_OFFSET + c[None, :], mask=valid[:, None] & (c[None, :] < RT3), other=0.0).to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = _dot(p, v, acc * alpha[:, None], IEEE)
            m_i = m_new
        out = ACC + b * stride_ab + s * stride_as + h[:, None] * stride_ah + c[None, :]
        tl.store(out, acc, mask=(h[:, None] < H) & (c[None, :] < RT3))
        tl.store(M + b * stride_mb + s * stride_ms + h, m_i, mask=h < H)
        tl.store(L + b * stride_mb + s * stride_ms + h, l_i, mask=h < H)


def paged_decode(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, latent_freqs: torch.Tensor | None = None, num_splits: int | None = None,
                 max_len: int | None = None) -> torch.Tensor:
    """query (B, H, r3) over each request's cached latents -> (B, H, rt3).

    kv_cache (num_blocks, 1, block_size, W): rows [rotated key r3 | value rt3], or with
    `latent_freqs` (shared latent) unrotated latents of width r3 that serve as key and value.
    `max_len` (at least the longest context) sizes the split-KV work; without it, the block
    table's width does (vLLM pads that to max_model_len).
    """
    B, H, r3 = query.shape
    block_size, width = kv_cache.shape[2], kv_cache.shape[3]
    shared = latent_freqs is not None
    rt3 = r3 if shared else width - r3
    max_blocks = block_table.shape[1] if max_len is None else max(1, -(-max_len // block_size))
    num_splits, per_split = split_work(B, max_blocks, num_splits)
    acc = torch.empty(B, num_splits, H, rt3, dtype=torch.float32, device=query.device)
    m = torch.empty(B, num_splits, H, dtype=torch.float32, device=query.device)
    l = torch.empty_like(m)
    freqs = (latent_freqs if shared else torch.zeros(r3 // 2, device=query.device)).to(torch.float64)
    query = query.contiguous()
    _decode_split[(B, num_splits)](
        query, kv_cache, block_table, seq_lens, freqs, acc, m, l,
        query.stride(0), query.stride(1), kv_cache.stride(0), kv_cache.stride(2), block_table.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1),
        scale, H, r3, rt3, 0 if shared else r3, block_size, per_split,
        H_PAD=_pow2(H), HALF_PAD=_pow2(r3 // 2), RT3_PAD=_pow2(rt3), BN=_pow2(block_size),
        SHARED=shared, IEEE=query.dtype == torch.float32,
    )
    return combine_splits(acc, m, l).to(query.dtype)


def split_work(batch: int, blocks: int, num_splits: int | None = None) -> tuple[int, int]:
    """Programs per request and blocks per program for requests of up to `blocks` blocks: by
    default enough programs to fill ~128 streaming multiprocessors, never more than blocks."""
    if num_splits is None:
        num_splits = max(1, min(blocks, -(-128 // max(batch, 1))))
    return num_splits, -(-blocks // num_splits)


def combine_splits(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Merge per-split softmax partials: acc (B, S, H, rt3), m and l (B, S, H) -> (B, H, rt3)."""
    top = m.max(1, keepdim=True).values
    weight = torch.exp(m - top).nan_to_num(0.0)  # splits that saw no token: m = -inf
    total = (weight * l).sum(1)
    out = (weight[..., None] * acc).sum(1) / total[..., None].clamp_min(1e-30)
    return torch.where(total[..., None] > 0, out, torch.zeros_like(out))
