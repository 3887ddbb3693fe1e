"""Paged latent attention in plain PyTorch: the CPU path of the vLLM backend and the reference
that the GPU kernels are tested against.

Cache: kv_cache (num_blocks, 1, block_size, r3 + rt3); each token's row holds its rotated latent
key (first r3) then its latent value. Every query head attends to the one shared latent (MQA).
Shared-latent mode (`latent_freqs` given): rows hold only the unrotated latent (r3), which is the
value as is and, rotated by the token's position at read time, the key.
Batch metadata follows vLLM: query_start_loc (B+1,), seq_lens (B,) = context including this
step's tokens, block_table (B, max_blocks), slot_mapping (T,) with -1 for padding tokens; decodes
(one new token) come first in a batch, as vLLM orders them for backends that ask it to.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tucker_serve.cache_dtypes import rounding_dtypes
from tucker_serve.rope import apply_rope, rope_cos_sin

FP8_CACHE_DTYPES = rounding_dtypes()  # the fp8 rows of the cache-dtype table, by name, as torch dtypes


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to the cache's element type; fp8 saturates at its largest finite value (as vLLM's kernels do)."""
    if dtype.itemsize == 1:
        limit = torch.finfo(dtype).max
        x = x.clamp(-limit, limit)
    return x.to(dtype)


def round_to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a cache of element type `dtype` gives back for x, in x's dtype."""
    return to_cache_dtype(x, dtype).to(x.dtype)


def write_latent_cache(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None,
                       slot_mapping: torch.Tensor) -> None:
    """Store key (T, r3) and value (T, rt3) rows at their slots (value None: shared latent);
    slot -1 is skipped. An fp8 cache holds the values as given: callers divide by their scales."""
    rows = kv_cache.view(-1, kv_cache.shape[-1])
    r3 = key.shape[-1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    rows[slots, :r3] = to_cache_dtype(key[keep], rows.dtype)
    if value is not None:
        rows[slots, r3:] = to_cache_dtype(value[keep], rows.dtype)


def keys_values(rows: torch.Tensor, r3: int, latent_freqs: torch.Tensor | None):
    """Keys and values of cache rows (..., L, W) of tokens at positions 0..L-1."""
    if latent_freqs is None:
        return rows[..., :r3], rows[..., r3:]
    cos, sin = rope_cos_sin(latent_freqs, torch.arange(rows.shape[-2], device=rows.device))
    return apply_rope(rows, cos, sin), rows


@functools.cache
def _fp8_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8, device=device).view(dtype).float()


def float_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows as `dtype`. fp8 rows are looked up in a 256-entry float32 table, faster on CPU than
    PyTorch's fp8 cast (docs/design.md s6)."""
    if rows.dtype.itemsize == 1:
        rows = torch.take(_fp8_table(rows.dtype, rows.device), rows.view(torch.uint8).long())
    return rows.to(dtype)


def gather_rows(kv_cache: torch.Tensor, block_table: torch.Tensor, max_len: int) -> torch.Tensor:
    """Cache rows of each request in token order: (B, max_len, r3 + rt3), junk past seq_lens."""
    block_size = kv_cache.shape[2]
    blocks = block_table[:, : -(-max_len // block_size)].long()  # (B, nb)
    return kv_cache[blocks].flatten(1, 3)[:, :max_len]  # (B, nb*bs, W) -> (B, max_len, W)


@dataclass(frozen=True)
class PagedBatch:
    """One step's requests, decodes first, with the host-side figures the loops need (built once per
    step, so that layers never wait on the device to learn a length)."""

    num_decodes: int  # requests 0..num_decodes-1 have one new token each, token i of request i
    query_start_loc: list[int]  # (B+1,) host copy
    context_lens: list[int]  # (B,) host copy of seq_lens (exact for prefills, an upper bound for decodes)
    seq_lens: torch.Tensor  # (B,) on the device
    block_table: torch.Tensor  # (B, max_blocks)

    @classmethod
    def of(cls, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor) -> "PagedBatch":
        """From vLLM-style tensors whose decodes come first (for tests and callers outside vLLM)."""
        starts = query_start_loc.tolist()
        q_lens = [b - a for a, b in zip(starts, starts[1:])]
        decodes = next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens))
        if any(n == 1 for n in q_lens[decodes:]):
            raise ValueError("decodes (one new token) must come first in the batch")
        return cls(decodes, starts, seq_lens.tolist(), seq_lens, block_table)

    @property
    def max_decode_len(self) -> int:
        return max(self.context_lens[: self.num_decodes], default=0)


def decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, latent_freqs: torch.Tensor | None = None,
                     max_len: int | None = None) -> torch.Tensor:
    """One new token per request, all requests at once: query (B, H, r3) -> (B, H, rt3), in float32
    for 16-bit queries (float64 ones stay float64). `max_len` (at least the longest context) spares
    reading it from the device. float32 arithmetic is faster than bfloat16 on CPU (docs/design.md s6)."""
    max_len = int(seq_lens.max()) if max_len is None else max_len
    dtype = torch.promote_types(query.dtype, torch.float32)
    rows = float_rows(gather_rows(kv_cache, block_table, max_len), dtype)  # (B, L, W)
    keys, values = keys_values(rows, query.shape[-1], latent_freqs)
    scores = torch.einsum("bhr,blr->bhl", query.to(dtype), keys) * scale
    past = torch.arange(max_len, device=query.device)[None] >= seq_lens[:, None]
    probs = scores.masked_fill(past[:, None], float("-inf")).softmax(-1)
    return torch.einsum("bhl,bls->bhs", probs, values)


def prefill_attention(query: torch.Tensor, rows: torch.Tensor, scale: float,
                      latent_freqs: torch.Tensor | None = None) -> torch.Tensor:
    """The last q of L tokens of one request attend causally: query (q, H, r3), rows (L, W) -> (q, H, rt3)."""
    q_len, ctx = query.shape[0], rows.shape[0]
    allowed = torch.arange(ctx, device=query.device)[None] <= torch.arange(ctx - q_len, ctx, device=query.device)[:, None]
    keys, values = keys_values(float_rows(rows, query.dtype), query.shape[-1], latent_freqs)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None], keys[None, None], values[None, None],
        attn_mask=allowed, scale=scale, enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def decode_routine(device: torch.device):
    """The batched decode for a device, chosen once per layer by the backend: the Triton kernel of
    `tucker_serve.ops.triton_decode` on CUDA when Triton is installed, else `decode_attention`."""
    if device.type == "cuda":
        from tucker_serve.ops.triton_decode import available, paged_decode

        if available(device):
            return paged_decode
    return decode_attention


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, batch: PagedBatch, scale: float,
                    out: torch.Tensor, latent_freqs: torch.Tensor | None = None, decode=decode_attention) -> torch.Tensor:
    """Attention of every scheduled token over its request's cached latents (cache already written).

    query (T, H, r3) -> out (T, H, rt3). The decodes are computed together in one batched call of
    `decode` (this module's `decode_attention`, or a kernel with its signature); longer queries
    (prefill, chunked prefill over a cached prefix) one by one.
    """
    d = batch.num_decodes
    if d:
        out[:d] = decode(query[:d], kv_cache, batch.block_table[:d], batch.seq_lens[:d], scale,
                         latent_freqs=latent_freqs, max_len=batch.max_decode_len).to(out.dtype)
    prefill_each(query, kv_cache, batch, scale, out, latent_freqs)
    return out


def prefill_each(query, kv_cache, batch: PagedBatch, scale, out, latent_freqs=None) -> None:
    """The requests after the decodes, one at a time (SDPA with the causal offset mask)."""
    starts = batch.query_start_loc
    for i in range(batch.num_decodes, len(batch.context_lens)):
        start, end, ctx = starts[i], starts[i + 1], batch.context_lens[i]
        rows = gather_rows(kv_cache, batch.block_table[i: i + 1], ctx)[0]
        out[start:end] = prefill_attention(query[start:end], rows, scale, latent_freqs).to(out.dtype)
