"""Attention statistics of a source Llama-family model on calibration text (float64 sums).

Per layer: the key covariance per RoPE frequency (complex, G x G), the query energy per head and
frequency, the Gram matrix of the stacked values, and per query head the Gram matrix of its
attention outputs over every group's values (y_h = A_h V). Conversion turns them into latent bases.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from tqdm import tqdm

from tucker_serve.families import Family, rope_parameters, supported_family
from tucker_serve.rope import apply_rope, llama_inv_freq, rope_cos_sin


@dataclass(frozen=True)
class AttentionShape:
    """Shape of a source model's attention, read from its Hugging Face config."""

    hidden: int
    heads: int
    groups: int
    head_dim: int
    inv_freq: torch.Tensor  # (head_dim/2,) float64, rope scaling applied
    family: Family

    @classmethod
    def from_config(cls, cfg: dict) -> "AttentionShape":
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        return cls(cfg["hidden_size"], heads, cfg.get("num_key_value_heads", heads), head_dim,
                   llama_inv_freq(head_dim, rope_parameters(cfg)), supported_family(cfg, "config.json"))

    @property
    def kv_width(self) -> int:
        return 2 * self.groups * self.head_dim


@dataclass
class LayerStats:
    key_cov: torch.Tensor  # (D/2, G, G) complex128, sum of z z^H
    key_attn_cov: torch.Tensor  # (D/2, G, G): per query, covariance of rotated keys under its attention
    query_energy: torch.Tensor  # (H, D/2), sum of |zq|^2
    value_gram: torch.Tensor  # (G*D, G*D), sum of v v^T
    out_gram: torch.Tensor  # (H, G*D, G*D), sum of y_h y_h^T
    tokens: int = 0

    @classmethod
    def zeros(cls, s: AttentionShape, device=None) -> "LayerStats":
        half, gd = s.head_dim // 2, s.groups * s.head_dim
        c128 = dict(dtype=torch.complex128, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(half, s.groups, s.groups, **c128), torch.zeros(half, s.groups, s.groups, **c128),
                   torch.zeros(s.heads, half, **f64), torch.zeros(gd, gd, **f64), torch.zeros(s.heads, gd, gd, **f64))

    def to(self, device) -> "LayerStats":
        return LayerStats(*(t.to(device) for t in (self.key_cov, self.key_attn_cov, self.query_energy,
                                                   self.value_gram, self.out_gram)), self.tokens)


def project_qkv(attn, x: torch.Tensor, s: AttentionShape):
    """Pre-RoPE q (T, H, D), k and v (T, G, D) of a transformers attention module."""
    q_proj, k_proj, v_proj, _ = s.family.attention_projections(attn)
    q = q_proj(x).unflatten(-1, (s.heads, s.head_dim))
    k = k_proj(x).unflatten(-1, (s.groups, s.head_dim))
    v = v_proj(x).unflatten(-1, (s.groups, s.head_dim))
    return q, k, v


def as_complex(x: torch.Tensor) -> torch.Tensor:
    """Rotate-half pairs (x[k], x[k + D/2]) as complex numbers: (..., D) -> (..., D/2)."""
    a, b = x.double().chunk(2, dim=-1)
    return torch.complex(a, b)


QUERIES = 1024  # attention statistics read at most this many query positions per window (evenly spaced)


@torch.no_grad()
def accumulate(stats: LayerStats, attn, x: torch.Tensor, s: AttentionShape) -> None:
    """Add one window x (T, d) of attention inputs to a layer's statistics.

    The attention-weighted statistics cost O(T^2): on long windows they read every stride-th query
    (still every key), scaled by the stride; the least-squares fits that use them do not depend on scale.
    """
    T, device = x.shape[0], x.device
    q, k, v = project_qkv(attn, x, s)
    zk, zq = as_complex(k), as_complex(q)  # (T, G, D/2), (T, H, D/2)
    stats.key_cov += torch.einsum("tgk,thk->kgh", zk, zk.conj())
    stats.query_energy += zq.abs().square().sum(0)
    vs = v.flatten(1)  # (T, G*D)
    stats.value_gram += (vs.T @ vs).double()
    stride = max(1, T // QUERIES)
    at = torch.arange(stride - 1, T, stride, device=device)  # query positions read, the last one included
    positions, inv_freq = torch.arange(T, device=device), s.inv_freq.to(device)
    cos, sin = rope_cos_sin(inv_freq, positions)
    qr = apply_rope(q[at], cos[at, None], sin[at, None]).transpose(0, 1)  # (H, S, D)
    kr = apply_rope(k, cos[:, None], sin[:, None]).transpose(0, 1)  # (G, T, D)
    scores = qr @ kr.repeat_interleave(s.heads // s.groups, 0).transpose(1, 2) * s.head_dim**-0.5
    probs = scores.masked_fill(positions[None] > at[:, None], float("-inf")).softmax(-1)  # (H, S, T)
    y = probs @ vs  # (H, S, G*D): head h's attention applied to every group's values
    # Softmax ignores logit errors common to all keys of a query: what matters is the spread of
    # the (rotated) keys under each query's attention, E_A[w w^H] - E_A[w] E_A[w]^H.
    zk32 = zk.to(torch.complex64)
    received = probs.sum((0, 1))  # (T,): attention each key receives, over heads and queries
    wz = zk32 * torch.polar(torch.ones_like(cos), positions[:, None] * inv_freq)[:, None].to(torch.complex64)
    flat = torch.view_as_real(wz).flatten(1)  # (T, G*D/2*2)
    mu = torch.view_as_complex((probs @ flat).unflatten(-1, (s.groups, s.head_dim // 2, 2)).contiguous())
    first = torch.einsum("t,tgk,thk->kgh", received.to(torch.complex64), zk32, zk32.conj())
    second = torch.einsum("mtgk,mthk->kgh", mu, mu.conj())
    stats.key_attn_cov += stride * (first - second).to(torch.complex128)
    stats.out_gram += stride * (y.transpose(1, 2) @ y).double()
    stats.tokens += T


# The statistics of recent calibrations, kept in memory: a process that converts one source at several
# ratios or widths (benchmark rows, the tests' session models) runs each calibration once. Bounded in
# bytes: a 7B model's statistics are several GB, and those are not kept.
KEPT_BYTES = 2**30
_kept: OrderedDict[tuple, list[LayerStats]] = OrderedDict()


def stats_bytes(stats: list[LayerStats]) -> int:
    return sum(t.numel() * t.element_size() for st in stats for t in (st.key_cov, st.key_attn_cov, st.query_energy,
                                                                       st.value_gram, st.out_gram))


def calibrated(model, model_key: str, token_ids: torch.Tensor, window: int, progress: bool = True) -> list[LayerStats]:
    """collect(), reused when the same model (`model_key`, e.g. its folder) already ran over the same
    tokens in the same windows in this process. Callers only read the statistics."""
    key = (model_key, window, hashlib.sha256(token_ids.numpy().tobytes()).hexdigest())
    if key in _kept:
        _kept.move_to_end(key)
        return _kept[key]
    stats = collect(model, token_ids, window, progress)
    _kept[key] = stats
    while _kept and sum(map(stats_bytes, _kept.values())) > KEPT_BYTES:
        _kept.popitem(last=False)  # the oldest first; a single entry over the bound is not kept either
    return stats


@torch.no_grad()
def collect(model, token_ids: torch.Tensor, window: int, progress: bool = True) -> list[LayerStats]:
    """Run a transformers Llama-family model over `token_ids` in windows, on the model's device;
    statistics per layer, on the CPU."""
    s = AttentionShape.from_config(model.config.to_dict())
    layers = model.model.layers
    device = model.device
    stats = [LayerStats.zeros(s, device) for _ in layers]

    def hook(index):
        def grab(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            accumulate(stats[index], module, x[0].float(), s)
        return grab

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        chunks = token_ids.split(window)
        for chunk in tqdm(chunks, desc="calibrating", unit="window", disable=not progress):
            model(chunk[None].to(device))
    finally:
        for h in handles:
            h.remove()
    return [st.to("cpu") for st in stats]
