"""CUDA path of the TUCKER backend (r3 != rt3 and shared latents; vLLM's own backends serve equal widths).

Decodes (one new token per request, first in the batch) go to the Triton kernel of
`tucker_serve.ops.triton_decode`, which reads each latent block once for all query heads.
Prefills use the PyTorch reference path.
"""

from __future__ import annotations

import torch

from tucker_serve.ops.paged import PagedBatch, decode_attention, paged_attention
from tucker_serve.ops.triton_decode import available, paged_decode


def gpu_attention(query: torch.Tensor, kv_cache: torch.Tensor, batch: PagedBatch, scale: float, out: torch.Tensor,
                  latent_freqs: torch.Tensor | None) -> None:
    decode = paged_decode if available(query.device) else decode_attention
    paged_attention(query, kv_cache, batch, scale, out, latent_freqs, decode=decode)
