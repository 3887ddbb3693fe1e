"""The latent RoPE of the vLLM plugin on CPU: vLLM's C++ kernel where the latent has a multiple of 8
pairs, vLLM's PyTorch version otherwise (the kernel crashed on a bfloat16 latent of 27 pairs, the
SmolLM2 4x conversion); both match the float64 reference rotation."""

import pytest
import torch

from tucker_serve.rope import apply_rope, rope_cos_sin


@pytest.mark.parametrize("pairs", [27, 6, 32])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.05), (torch.float32, 1e-5)])
def test_latent_rope_matches_the_reference_at_every_width(pairs, dtype, tol):
    from vllm.config import VllmConfig, set_current_vllm_config

    from tucker_vllm.model import LatentRotaryEmbedding

    torch.manual_seed(0)
    freqs = torch.rand(pairs, dtype=torch.float64)
    with set_current_vllm_config(VllmConfig()):
        rope = LatentRotaryEmbedding(freqs, 512, dtype)
    positions = torch.randint(0, 512, (300,))
    heads = 3
    q = torch.randn(300, heads * 2 * pairs, dtype=dtype)
    k = torch.randn(300, 2 * pairs, dtype=dtype)
    q_out, k_out = rope.forward_cpu(positions, q.clone(), k.clone())
    cos, sin = rope_cos_sin(freqs, positions)
    want_k = apply_rope(k.double(), cos, sin)
    want_q = apply_rope(q.double().unflatten(-1, (heads, -1)).transpose(0, 1), cos, sin).transpose(0, 1).flatten(1)
    assert (k_out.double() - want_k).abs().max() <= tol
    assert (q_out.double() - want_q).abs().max() <= tol
