"""The identities: full-rank Tucker equals MHA, GQA, MQA and MLA; latent RoPE is relative; HOSVD."""

import pytest
import torch

from helpers import gqa_attention, mla_attention
from tucker_serve.attention import TuckerAttention
from tucker_serve.rope import default_inv_freq
from tucker_serve.tucker import attention_tensors, factorize, from_gqa, from_mla, hosvd, reconstruct
from tucker_serve.config import TuckerConfig

F64_EXACT = 1e-10  # relative error allowed for identities computed in float64
D_MODEL, HEADS, HEAD_DIM, TOKENS = 64, 8, 8, 24


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_gqa(groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) / s[-2] ** 0.5
    return (
        w(HEADS, D_MODEL, HEAD_DIM), w(groups, D_MODEL, HEAD_DIM),
        w(groups, D_MODEL, HEAD_DIM), w(HEADS, HEAD_DIM, D_MODEL),
    )


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randn(TOKENS, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("groups", [HEADS, 4, 2, 1], ids=["mha", "gqa4", "gqa2", "mqa"])
def test_full_rank_tucker_reproduces_gqa_with_rope(groups):
    Wq, Wk, Wv, Wo = random_gqa(groups)
    inv_freq = default_inv_freq(HEAD_DIM, 10000.0)
    x, pos = tokens(), torch.arange(TOKENS)
    factors, freqs = from_gqa(Wq, Wk, Wv, Wo, inv_freq)
    attn = TuckerAttention.from_factors(factors, freqs, scale=HEAD_DIM**-0.5)
    assert factors.config().pre_ranks == (HEADS, HEADS * HEAD_DIM, groups * HEAD_DIM)
    assert rel_err(attn(x[None], pos)[0], gqa_attention(x, Wq, Wk, Wv, Wo, inv_freq, pos)) <= F64_EXACT


def test_full_rank_tucker_reproduces_mla_with_latent_rope():
    g = torch.Generator().manual_seed(3)
    dq, dc = 24, 16
    w = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) / s[-2] ** 0.5
    W_dq, W_uq, W_dkv = w(D_MODEL, dq), w(HEADS, dq, HEAD_DIM), w(D_MODEL, dc)
    W_uk, W_uv, Wo = w(HEADS, dc, HEAD_DIM), w(HEADS, dc, HEAD_DIM), w(HEADS, HEAD_DIM, D_MODEL)
    inv_freq = default_inv_freq(dc, 10000.0)
    x, pos = tokens(), torch.arange(TOKENS)
    factors = from_mla(W_dq, W_uq, W_dkv, W_uk, W_uv, Wo)
    attn = TuckerAttention.from_factors(factors, inv_freq, scale=HEAD_DIM**-0.5)
    assert attn.config.shared_latent and attn.v_latent is None
    want = mla_attention(x, W_dq, W_uq, W_dkv, W_uk, W_uv, Wo, inv_freq, pos)
    assert rel_err(attn(x[None], pos)[0], want) <= F64_EXACT


def test_latent_rope_depends_only_on_relative_position():
    torch.manual_seed(4)
    cfg = TuckerConfig(D_MODEL, HEADS, r1=4, r2=16, r3=12, rt1=4, rt2=16, rt3=10)
    attn = TuckerAttention(cfg, dtype=torch.float64)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = tokens()[None]
    base = attn(x, torch.arange(TOKENS))
    shifted = attn(x, torch.arange(TOKENS) + 1000)
    assert rel_err(shifted, base) <= F64_EXACT
    # Not vacuous: a different relative layout changes the output.
    assert rel_err(attn(x, torch.arange(TOKENS) * 2), base) > 1e-3


def test_truncated_hosvd_error_decreases_with_rank_and_is_exact_at_full_rank():
    T, _ = attention_tensors(*random_gqa(HEADS, seed=5))
    errors = []
    for r in (1, 8, 16, 32, 48, 64):
        core, factors = hosvd(T, (min(r, HEADS), r, r))
        errors.append(rel_err(reconstruct(core, factors), T))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] <= F64_EXACT
    assert errors[0] > 0.5


def test_hooi_fits_at_least_as_well_as_hosvd():
    T, _ = attention_tensors(*random_gqa(2, seed=6))
    ranks = (4, 20, 12)
    plain = rel_err(reconstruct(*hosvd(T, ranks)), T)
    refined = rel_err(reconstruct(*hosvd(T, ranks, iters=5)), T)
    assert refined <= plain + 1e-12
    assert 0.01 < refined < 1


def test_full_rank_hosvd_attention_equals_dense_attention_without_rope():
    Wq, Wk, Wv, Wo = random_gqa(2, seed=7)
    T, Tt = attention_tensors(Wq, Wk, Wv, Wo)
    cfg = TuckerConfig(D_MODEL, HEADS, HEADS, D_MODEL, D_MODEL, HEADS, D_MODEL, D_MODEL, rope=False)
    factors = factorize(T, Tt, cfg)
    attn = TuckerAttention.from_factors(factors, scale=HEAD_DIM**-0.5, rope=False)
    x = tokens()
    no_rope = torch.zeros(HEAD_DIM // 2, dtype=torch.float64)  # every angle 0
    want = gqa_attention(x, Wq, Wk, Wv, Wo, no_rope, torch.arange(TOKENS))
    assert rel_err(attn(x[None])[0], want) <= F64_EXACT


@pytest.mark.parametrize("r3, rt3", [(8, 20), (20, 8), (12, 12)])
def test_latent_attention_with_unequal_key_and_value_widths_is_plain_causal_attention(r3, rt3):
    """Zero-padding the narrower side (so SDPA keeps a fused kernel) changes nothing."""
    from tucker_serve.attention import latent_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 10, r3), torch.randn(2, 10, r3), torch.randn(2, 10, rt3)
    scores = (q @ k[:, None].transpose(-1, -2)) * 0.3
    scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    want = scores.softmax(-1) @ v[:, None]
    got = latent_attention(q, k, v, 0.3)
    assert got.shape == (2, 3, 10, rt3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
