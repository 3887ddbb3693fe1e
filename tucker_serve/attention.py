"""Reference Tucker attention in PyTorch: the forward pass of docs/design.md s1, never forming d x d.

Parameters are the serving form of the factors: shared maps U2, U3, Ut3, Ut2 and per-head cores
B_h, Bt_h (the Tucker core folded with the head factor). With `block_core` a head's core reads
only its own r2/H slice of the shared query and writes its own rt2/H slice of the output: the
block-diagonal cores that exact conversions of MHA/GQA produce, stored without their zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tucker_serve.config import TuckerConfig
from tucker_serve.ops.paged import round_to_cache
from tucker_serve.rope import apply_rope, default_inv_freq, rope_cos_sin
from tucker_serve.tucker import TuckerFactors


try:  # the optional `gpu` extra: flash-attention for the reference model on CUDA (healing, evaluation)
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def latent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal MQA over one shared latent: q (B, H, T, r3), k (B, T, r3), v (B, T, rt3) -> (B, H, T, rt3).
    flash-attention when installed and the tensors are 16-bit on CUDA, PyTorch SDPA otherwise. SDPA's
    fused kernels want one head size: with r3 != rt3 it falls back to materialized scores (8x slower at
    4,096 tokens on CPU), so the narrower side is zero-padded, which changes no score and no output."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_latent_attention(q, k, v, scale)
    width = max(q.shape[-1], v.shape[-1])
    out = F.scaled_dot_product_attention(
        _pad(q, width), _pad(k, width)[:, None], _pad(v, width)[:, None], is_causal=True, scale=scale, enable_gqa=True
    )
    return out[..., : v.shape[-1]]


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """`t` zero-padded on its last dimension to `width`: adds nothing to scores, and output columns
    that are cut off again."""
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


def flash_latent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """flash_attn_func with one KV head. It wants one head size for q, k and v (a multiple of 8, at
    most 256): zero-padding q and k adds nothing to the scores, zero-padding v adds columns that are
    cut off again."""
    r3, rt3 = q.shape[-1], v.shape[-1]
    width = -(-max(r3, rt3) // 8) * 8
    if width > 256:
        raise ValueError(f"flash-attention takes head sizes up to 256, the latent needs {width}")
    out = flash_attn_func(_pad(q, width).transpose(1, 2), _pad(k, width)[:, :, None], _pad(v, width)[:, :, None],
                          softmax_scale=scale, causal=True)  # (B, T, H, width)
    return out[..., :rt3].transpose(1, 2)


class TuckerAttention(nn.Module):
    """Causal self-attention through a shared latent key/value and per-head cores."""

    def __init__(
        self,
        config: TuckerConfig,
        latent_freqs: torch.Tensor | None = None,
        scale: float | None = None,
        block_core: bool = False,
        rope_base: float = 10000.0,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        c = config
        self.config, self.block_core, self.cache_dtype = c, block_core, cache_dtype
        self.scale = 1.0 / math.sqrt(c.r3) if scale is None else scale
        if block_core and (c.r2 % c.num_heads or c.rt2 % c.num_heads):
            raise ValueError(f"block_core needs r2={c.r2} and rt2={c.rt2} divisible by num_heads={c.num_heads}")
        q_in = c.r2 // c.num_heads if block_core else c.r2
        o_out = c.rt2 // c.num_heads if block_core else c.rt2
        linear = lambda i, o, b: nn.Linear(i, o, bias=b, dtype=dtype)
        self.q_shared = linear(c.hidden_size, c.r2, bias)  # U2^T
        self.q_core = nn.Parameter(torch.zeros(c.num_heads, q_in, c.r3, dtype=dtype))  # B_h
        self.k_latent = linear(c.hidden_size, c.r3, bias)  # U3^T
        self.v_latent = None if c.shared_latent else linear(c.hidden_size, c.rt3, bias)  # Ut3^T
        self.o_core = nn.Parameter(torch.zeros(c.num_heads, o_out, c.rt3, dtype=dtype))  # Bt_h
        self.o_shared = linear(c.rt2, c.hidden_size, False)  # Ut2
        if c.rope:
            freqs = default_inv_freq(c.r3, rope_base) if latent_freqs is None else latent_freqs
            if tuple(freqs.shape) != (c.r3 // 2,):
                raise ValueError(f"latent_freqs has shape {tuple(freqs.shape)}, expected ({c.r3 // 2},)")
            self.register_buffer("latent_freqs", freqs.to(torch.float64), persistent=False)

    @classmethod
    def from_factors(cls, factors: TuckerFactors, latent_freqs=None, scale=None, rope=True) -> "TuckerAttention":
        """Build from Tucker factors (dense per-head cores), copying the folded weights."""
        module = cls(factors.config(rope), latent_freqs, scale, dtype=factors.U2.dtype)
        B, Bt = factors.fold()
        with torch.no_grad():
            module.q_shared.weight.copy_(factors.U2.T)
            module.q_core.copy_(B)
            module.k_latent.weight.copy_(factors.U3.T)
            if module.v_latent is not None:
                module.v_latent.weight.copy_(factors.Ut3.T)
            module.o_core.copy_(Bt)
            module.o_shared.weight.copy_(factors.Ut2)
        return module

    def cached(self, t: torch.Tensor) -> torch.Tensor:
        """What a serving cache of `cache_dtype` gives back for `t` (unchanged when it is None)."""
        return t if self.cache_dtype is None else round_to_cache(t, self.cache_dtype)

    def latents(self, x: torch.Tensor, positions: torch.Tensor):
        """Rotated per-head queries (B, H, T, r3), rotated key (B, T, r3), value (B, T, rt3), the
        key and value as a cache of `cache_dtype` returns them."""
        c = self.config
        qs = self.q_shared(x)  # (B, T, r2)
        if self.block_core:
            q = torch.einsum("bthr,hrs->bhts", qs.unflatten(-1, (c.num_heads, -1)), self.q_core)
        else:
            q = torch.einsum("btr,hrs->bhts", qs, self.q_core)
        shared = self.v_latent is None
        k = self.k_latent(x)  # (B, T, r3)
        if shared:  # the cache holds the unrotated latent: the value, and rotated, the key
            k = v = self.cached(k)
        else:
            v = self.v_latent(x)
        if c.rope:
            cos, sin = rope_cos_sin(self.latent_freqs, positions)  # (B, T, r3/2) or (T, r3/2)
            q = apply_rope(q, cos.unsqueeze(-3), sin.unsqueeze(-3))
            k = apply_rope(k, cos, sin)
        if not shared:  # the cache holds the rotated key and the value
            k, v = self.cached(k), self.cached(v)
        return q, k, v

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """Fold per-head latent outputs y (B, H, T, rt3) to the model width (B, T, d)."""
        if self.block_core:
            z = torch.einsum("bhts,hos->btho", y, self.o_core).flatten(-2)  # (B, T, rt2)
        else:
            z = torch.einsum("bhts,hos->bto", y, self.o_core)
        return self.o_shared(z)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d), positions (B, T) or (T,) (default 0..T-1) -> (B, T, d)."""
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        q, k, v = self.latents(x, positions)
        return self.output(latent_attention(q, k, v, self.scale))
