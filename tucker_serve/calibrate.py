"""Attention statistics of a source Llama-family model on calibration text (float64 sums).

Per layer: the key covariance per RoPE frequency (complex, G x G), the query energy per head and
frequency, the Gram matrix of the stacked values, and per query head the Gram matrix of its
attention outputs over every group's values (y_h = A_h V). Conversion turns them into latent bases.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tucker_serve.families import Family, rope_parameters, supported_family
from tucker_serve.paths import cache_dir
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
QUERY_CHUNK_BYTES = 2**25  # ...in chunks whose attention probabilities (float32, H x queries x T) fit this


@torch.no_grad()
def accumulate(stats: LayerStats, attn, x: torch.Tensor, s: AttentionShape) -> None:
    """Add one window x (T, d) of attention inputs to a layer's statistics.

    The attention-weighted statistics cost O(T^2): on long windows they read every stride-th query
    (still every key), scaled by the stride; the least-squares fits that use them do not depend on scale.
    """
    T, device = x.shape[0], x.device
    q, k, v = project_qkv(attn, x, s)
    zk = as_complex(k)  # (T, G, D/2)
    stats.key_cov += torch.einsum("tgk,thk->kgh", zk, zk.conj())
    for part in q.split(MLP_TOKENS):  # |zq|^2 (T, H, D/2) in float64, a part at a time
        stats.query_energy += as_complex(part).abs().square().sum(0)
    vs = v.flatten(1)  # (T, G*D)
    stats.value_gram += (vs.T @ vs).double()
    stride = max(1, T // QUERIES)
    at = torch.arange(stride - 1, T, stride, device=device)  # query positions read, the last one included
    positions, inv_freq = torch.arange(T, device=device), s.inv_freq.to(device)
    cos, sin = rope_cos_sin(inv_freq, positions)
    kr = apply_rope(k, cos[:, None], sin[:, None]).transpose(0, 1).repeat_interleave(s.heads // s.groups, 0)
    # Softmax ignores logit errors common to all keys of a query: what matters is the spread of
    # the (rotated) keys under each query's attention, E_A[w w^H] - E_A[w] E_A[w]^H.
    zk32 = zk.to(torch.complex64)
    wz = zk32 * torch.polar(torch.ones_like(cos), positions[:, None] * inv_freq)[:, None].to(torch.complex64)
    flat = torch.view_as_real(wz).flatten(1)  # (T, G*D/2*2)
    received = torch.zeros(T, device=device)  # attention each key receives, over heads and queries
    second = torch.zeros_like(stats.key_attn_cov, dtype=torch.complex64)
    for chunk in at.split(max(1, QUERY_CHUNK_BYTES // (4 * s.heads * T))):  # bounded (H, queries, T) tensors
        qr = apply_rope(q[chunk], cos[chunk, None], sin[chunk, None]).transpose(0, 1)  # (H, S, D)
        scores = qr @ kr.transpose(1, 2) * s.head_dim**-0.5
        probs = scores.masked_fill_(positions[None] > chunk[:, None], float("-inf")).softmax(-1)  # (H, S, T)
        del scores
        y = probs @ vs  # (H, S, G*D): head h's attention applied to every group's values
        stats.out_gram += stride * (y.transpose(1, 2) @ y).double()
        received += probs.sum((0, 1))
        mu = torch.view_as_complex((probs @ flat).unflatten(-1, (s.groups, s.head_dim // 2, 2)).contiguous())
        second += torch.einsum("mtgk,mthk->kgh", mu, mu.conj())
    first = torch.einsum("t,tgk,thk->kgh", received.to(torch.complex64), zk32, zk32.conj())
    stats.key_attn_cov += stride * (first - second).to(torch.complex128)
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
    if isinstance(stats, SpilledStats):  # on disk: not kept
        return stats
    _kept[key] = stats
    while _kept and sum(map(stats_bytes, _kept.values())) > KEPT_BYTES:
        _kept.popitem(last=False)  # the oldest first; a single entry over the bound is not kept either
    return stats


MLP_TOKENS = 512  # calibration runs each layer's MLP over this many tokens at a time (TokenChunks)
IN_MEMORY_BYTES = 2**28  # a model's statistics above this go to disk (SpilledStats), a layer at a time


@torch.no_grad()
def collect(model, token_ids: torch.Tensor, window: int, progress: bool = True):
    """Run a transformers Llama-family model over `token_ids` in windows, one layer at a time on the
    model's device: every window's hidden states pass through layer i while its statistics gather,
    then on to layer i+1. So only one layer's statistics are ever on the device, and the LM head
    never runs. Per layer, on the CPU: a list, or SpilledStats when they are over IN_MEMORY_BYTES
    (an 8B model's are 9 GB, mostly the per-head output Gram matrices)."""
    s = AttentionShape.from_config(model.config.to_dict())
    body, device = model.model, model.device
    windows = token_ids.split(window)
    hidden = [body.embed_tokens(w[None].to(device)).float() for w in windows]
    positions = [torch.arange(w.numel(), device=device)[None] for w in windows]
    rotary = [body.rotary_emb(x, pos) for x, pos in zip(hidden, positions)]
    spill = stats_bytes([LayerStats.zeros(s, "meta")]) * len(body.layers) > IN_MEMORY_BYTES
    stats = SpilledStats() if spill else []
    for layer in tqdm(body.layers, desc="calibrating", unit="layer", disable=not progress):
        st = LayerStats.zeros(s, device)

        def grab(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            accumulate(st, module, x[0].float(), s)

        handle = layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True)
        mlp, layer.mlp = layer.mlp, TokenChunks(layer.mlp)
        try:
            for w in range(len(hidden)):  # in place: one window's old states at a time
                hidden[w] = layer(hidden[w], position_embeddings=rotary[w], position_ids=positions[w])
        finally:
            handle.remove()
            layer.mlp = mlp
        stats.append(st.to("cpu"))
    return stats


class TokenChunks(torch.nn.Module):
    """A per-token module (the MLP) run over MLP_TOKENS tokens at a time: its activations on a long
    window are several times the hidden states' size (3 x 4,096 x 8,192 floats, 0.4 GB, in a 1B model)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.inner(part) for part in x.split(MLP_TOKENS, dim=-2)], dim=-2)


class SpilledStats:
    """Per-layer statistics in a temporary folder of the cache, read back a layer at a time (the
    last one read stays in memory: conversion reads each layer's several times in a row)."""

    def __init__(self) -> None:
        root = cache_dir() / "tmp"
        root.mkdir(parents=True, exist_ok=True)
        self._dir = tempfile.TemporaryDirectory(prefix="calibration-", dir=root)
        self._count, self._last = 0, (None, None)

    def append(self, st: LayerStats) -> None:
        torch.save(vars(st), Path(self._dir.name) / f"{self._count}.pt")
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> LayerStats:
        if not 0 <= i < self._count:
            raise IndexError(i)
        if self._last[0] != i:
            self._last = (i, LayerStats(**torch.load(Path(self._dir.name) / f"{i}.pt", weights_only=True)))
        return self._last[1]
