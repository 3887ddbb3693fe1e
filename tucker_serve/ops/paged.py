"""Paged latent attention in plain PyTorch: the CPU path of the vLLM backend and the reference
that the GPU kernels are tested against.

Cache: kv_cache (num_blocks, 1, block_size, r3 + rt3); each token's row holds its rotated latent
key (first r3) then its latent value. Every query head attends to the one shared latent (MQA).
Batch metadata follows vLLM: query_start_loc (B+1,), seq_lens (B,) = context including this
step's tokens, block_table (B, max_blocks), slot_mapping (T,) with -1 for padding tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_latent_cache(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Store key (T, r3) and value (T, rt3) rows at their slots; slot -1 is skipped."""
    rows = kv_cache.view(-1, kv_cache.shape[-1])
    r3 = key.shape[-1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    rows[slots, :r3] = key[keep].to(rows.dtype)
    rows[slots, r3:] = value[keep].to(rows.dtype)


def gather_rows(kv_cache: torch.Tensor, block_table: torch.Tensor, max_len: int) -> torch.Tensor:
    """Cache rows of each request in token order: (B, max_len, r3 + rt3), junk past seq_lens."""
    block_size = kv_cache.shape[2]
    blocks = block_table[:, : -(-max_len // block_size)].long()  # (B, nb)
    return kv_cache[blocks].flatten(1, 3)[:, :max_len]  # (B, nb*bs, W) -> (B, max_len, W)


def decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, r3: int, scale: float) -> torch.Tensor:
    """One new token per request, all requests at once: query (B, H, r3) -> (B, H, rt3)."""
    max_len = int(seq_lens.max())
    rows = gather_rows(kv_cache, block_table, max_len).to(query.dtype)  # (B, L, W)
    scores = torch.einsum("bhr,blr->bhl", query, rows[..., :r3]) * scale
    past = torch.arange(max_len, device=query.device)[None] >= seq_lens[:, None]
    probs = scores.masked_fill(past[:, None], float("-inf")).softmax(-1)
    return torch.einsum("bhl,bls->bhs", probs, rows[..., r3:])


def prefill_attention(query: torch.Tensor, rows: torch.Tensor, r3: int, scale: float) -> torch.Tensor:
    """The last q of L tokens of one request attend causally: query (q, H, r3), rows (L, W) -> (q, H, rt3)."""
    q_len, ctx = query.shape[0], rows.shape[0]
    allowed = torch.arange(ctx, device=query.device)[None] <= torch.arange(ctx - q_len, ctx, device=query.device)[:, None]
    k, v = rows[None, None, :, :r3], rows[None, None, :, r3:]  # (1, 1, L, r3), (1, 1, L, rt3)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None], k.to(query.dtype), v.to(query.dtype),
        attn_mask=allowed, scale=scale, enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float,
                    out: torch.Tensor) -> torch.Tensor:
    """Attention of every scheduled token over its request's cached latents (cache already written).

    query (T, H, r3) -> out (T, H, rt3). Requests with one query token are decoded together in one
    batched computation; longer ones (prefill, chunked prefill over a cached prefix) one by one.
    """
    r3 = query.shape[-1]
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    single = torch.nonzero(q_lens == 1).flatten()
    if single.numel():
        tokens = query_start_loc[single].long()
        out[tokens] = decode_attention(query[tokens], kv_cache, block_table[single], seq_lens[single],
                                       r3, scale).to(out.dtype)
    for i in torch.nonzero(q_lens > 1).flatten().tolist():
        start, end, ctx = int(query_start_loc[i]), int(query_start_loc[i + 1]), int(seq_lens[i])
        rows = gather_rows(kv_cache, block_table[i: i + 1], ctx)[0]
        out[start:end] = prefill_attention(query[start:end], rows, r3, scale).to(out.dtype)
    return out
