"""The serving fold on CPU: one QKV projection's query part and one output projection compute what
the reference attention computes from its factors (block and dense cores, with and without biases)."""

import pytest
import torch

from helpers import relative
from tucker_serve.attention import TuckerAttention
from tucker_serve.config import TuckerConfig
from tucker_serve.fold import fold_output, fold_query

TOL = 1e-5  # float32 (the fold computes in float32), relative to the largest entry
H, D_MODEL, R3, RT3 = 4, 32, 6, 10


def random_attention(block: bool, bias: bool) -> TuckerAttention:
    cfg = TuckerConfig(hidden_size=D_MODEL, num_heads=H, r1=H, r2=24, r3=R3, rt1=H, rt2=16, rt3=RT3, rope=False)
    attn = TuckerAttention(cfg, block_core=block, bias=bias)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return attn


@pytest.mark.parametrize("block", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_query_projection_gives_every_heads_latent_query(block, bias):
    attn = random_attention(block, bias)
    x = torch.randn(2, 7, D_MODEL, generator=torch.Generator().manual_seed(1))
    weight, b = fold_query(attn.q_shared.weight, attn.q_shared.bias, attn.q_core, block)
    assert weight.shape == (H * R3, D_MODEL) and (b is None) == (not bias)
    got = torch.nn.functional.linear(x, weight, b).unflatten(-1, (H, R3)).transpose(1, 2)  # (B, H, T, r3)
    want, _, _ = attn.latents(x, torch.arange(7))
    assert relative(got, want.detach()) <= TOL


@pytest.mark.parametrize("block", [True, False])
def test_folded_output_projection_maps_every_heads_latent_output(block):
    attn = random_attention(block, bias=False)
    y = torch.randn(2, H, 7, RT3, generator=torch.Generator().manual_seed(2))  # (B, H, T, rt3)
    weight = fold_output(attn.o_shared.weight, attn.o_core, block)
    assert weight.shape == (D_MODEL, H * RT3)
    got = y.transpose(1, 2).flatten(-2) @ weight.T  # heads side by side, as vLLM's o_proj reads them
    assert relative(got, attn.output(y).detach()) <= TOL
