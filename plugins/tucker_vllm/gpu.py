"""CUDA path of the TUCKER backend (r3 != rt3 and shared latents; vLLM's own backends serve equal widths).

Decodes (one new token per request, first in the batch) go to the Triton kernel of
`tucker_serve.ops.triton_decode`, which reads each latent block once for all query heads.
Prefills use the PyTorch reference path.
"""

from __future__ import annotations

import torch

from tucker_serve.ops.paged import PagedBatch, decode_attention, prefill_each
from tucker_serve.ops.triton_decode import available, paged_decode


def gpu_attention(query: torch.Tensor, kv_cache: torch.Tensor, batch: PagedBatch, scale: float, out: torch.Tensor,
                  latent_freqs: torch.Tensor | None) -> None:
    d = batch.num_decodes
    if d:
        args = (query[:d], kv_cache, batch.block_table[:d], batch.seq_lens[:d], scale)
        if available(query.device):
            result = paged_decode(*args, latent_freqs=latent_freqs, max_len=batch.max_decode_len)
        else:
            result = decode_attention(*args, latent_freqs=latent_freqs, max_len=batch.max_decode_len)
        out[:d] = result.to(out.dtype)
    prefill_each(query, kv_cache, batch, scale, out, latent_freqs)
