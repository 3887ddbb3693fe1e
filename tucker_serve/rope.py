"""Latent RoPE: rotate-half rotary embedding with an explicit frequency per pair.

A latent of width r is split into halves (x1, x2); pair i = (x1[i], x2[i]) is the complex number
x1[i] + i*x2[i], rotated by position * freqs[i]. Llama's per-head RoPE is the special case
freqs = theta_k over one head; a converted model carries its own per-pair vector (docs/design.md s2).
"""

from __future__ import annotations

import math

import torch


def default_inv_freq(dim: int, base: float = 10000.0) -> torch.Tensor:
    """The standard schedule over `dim` rotated dims: base^(-2i/dim), i < dim/2 (float64)."""
    if dim % 2:
        raise ValueError(f"RoPE dim={dim} must be even")
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def llama_inv_freq(head_dim: int, rope_parameters: dict) -> torch.Tensor:
    """Per-head inverse frequencies of a Llama-family config (default, linear, llama3 types)."""
    kind = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    inv = default_inv_freq(head_dim, float(rope_parameters.get("rope_theta", 10000.0)))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(rope_parameters["factor"])
    if kind == "llama3":
        return _llama3_scale(inv, rope_parameters)
    raise ValueError(
        f"unsupported rope_type {kind!r}: supported are default, linear and llama3 "
        "(types that only rescale frequencies)"
    )


def _llama3_scale(inv: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_len = float(p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > old_len / low, inv / factor, inv)
    between = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(between, mid, out)


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of positions x freqs, shape positions.shape + (len(freqs),), in float64."""
    angles = positions.to(torch.float64)[..., None] * freqs.to(torch.float64)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x (..., r) with cos/sin (..., r/2) broadcast against x's leading dims."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def complex_basis_map(bases: list[torch.Tensor], head_dim: int) -> torch.Tensor:
    """Real maps from each KV head's rotate-half coordinates to the RoPE-structured latent.

    bases[k] is a complex (G, m_k) matrix P_k for frequency k < head_dim/2. A head g's coordinates
    at frequency k form z = x[k] + i*x[k + head_dim/2]; the latent keeps P_k^H z_k (m_k complex
    numbers), real parts in the first half of the latent and imaginary parts in the second, in
    frequency-major order. Returns A (G, head_dim, r3) with latent = sum_g x_g @ A[g]. The same map
    sends a query head of group g to its latent query: conj(P_k[g, j]) * zq (docs/design.md s2).
    """
    half = head_dim // 2
    if len(bases) != half:
        raise ValueError(f"need one basis per frequency: got {len(bases)}, head_dim/2={half}")
    groups = bases[0].shape[0]
    slots = sum(p.shape[1] for p in bases)
    out = torch.zeros(groups, head_dim, 2 * slots, dtype=bases[0].real.dtype)
    s = 0
    for k, p in enumerate(bases):
        m = p.shape[1]
        a, b = p.real, p.imag  # (G, m)
        re, im = slice(s, s + m), slice(slots + s, slots + s + m)
        out[:, k, re], out[:, half + k, re] = a, b
        out[:, k, im], out[:, half + k, im] = -b, a
        s += m
    return out


def basis_freqs(bases: list[torch.Tensor], inv_freq: torch.Tensor) -> torch.Tensor:
    """Per-pair latent frequencies for `complex_basis_map`: theta_k repeated m_k times."""
    counts = torch.tensor([p.shape[1] for p in bases])
    return inv_freq.to(torch.float64).repeat_interleave(counts)


def identity_bases(groups: int, head_dim: int, dtype=torch.complex128) -> list[torch.Tensor]:
    """Full-rank bases P_k = I_G: the exact RoPE-structured latent of G KV heads."""
    return [torch.eye(groups, dtype=dtype) for _ in range(head_dim // 2)]
