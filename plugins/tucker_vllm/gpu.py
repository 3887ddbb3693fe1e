"""CUDA path of the TUCKER backend: Triton paged decode, flash-attention prefill.

Decodes (one new token per request) go to the Triton kernel of `tucker_serve.ops.triton_decode`,
which reads each latent block once for all query heads. Prefills go to vLLM's bundled
`flash_attn_varlen_func` over the paged cache (MQA: one KV head) when the latent fits it (equal
key and value widths, a multiple of 8 up to 256, separate K/V); otherwise to the PyTorch reference.
"""

from __future__ import annotations

import torch

from tucker_serve.ops.paged import decode_attention, prefill_each
from tucker_serve.ops.triton_decode import available, paged_decode


def gpu_attention(query: torch.Tensor, kv_cache: torch.Tensor, m, scale: float, out: torch.Tensor,
                  latent_freqs: torch.Tensor | None) -> None:
    q_lens = m.query_start_loc[1:] - m.query_start_loc[:-1]
    single = torch.nonzero(q_lens == 1).flatten()
    if single.numel():
        tokens = m.query_start_loc[single].long()
        args = (query[tokens], kv_cache, m.block_table[single], m.seq_lens[single], scale)
        if available(query.device):
            result = paged_decode(*args, latent_freqs=latent_freqs)
        else:
            result = decode_attention(*args, latent_freqs=latent_freqs)
        out[tokens] = result.to(out.dtype)
    longer = torch.nonzero(q_lens > 1).flatten()
    if not longer.numel():
        return
    if not flash_prefill(query, kv_cache, m, longer, scale, out, latent_freqs):
        prefill_each(query, kv_cache, m.query_start_loc, m.seq_lens, m.block_table, scale, out, latent_freqs)


def flash_prefill(query, kv_cache, m, reqs, scale, out, latent_freqs) -> bool:
    """Prefill requests `reqs` with flash-attention; False when the latent does not fit the kernel."""
    r3 = query.shape[-1]
    width, block_size = kv_cache.shape[-1], kv_cache.shape[2]
    if latent_freqs is not None or width != 2 * r3 or r3 % 8 or r3 > 256 or block_size % 16:
        return False
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return False
    starts, ends = m.query_start_loc[reqs].long(), m.query_start_loc[reqs + 1].long()
    tokens = torch.cat([torch.arange(int(a), int(b), device=query.device) for a, b in zip(starts, ends)])
    lens = (ends - starts).to(torch.int32)
    cu = torch.zeros(len(reqs) + 1, dtype=torch.int32, device=query.device)
    cu[1:] = lens.cumsum(0)
    k_cache = kv_cache[:, 0, :, :r3].unsqueeze(2)  # (num_blocks, block_size, 1, r3), strided view
    v_cache = kv_cache[:, 0, :, r3:].unsqueeze(2)
    result = flash_attn_varlen_func(
        q=query[tokens], k=k_cache, v=v_cache, max_seqlen_q=int(lens.max()), cu_seqlens_q=cu,
        max_seqlen_k=int(m.seq_lens[reqs].max()), seqused_k=m.seq_lens[reqs], softmax_scale=scale,
        causal=True, block_table=m.block_table[reqs],
    )
    out[tokens] = result.to(out.dtype)
    return True
