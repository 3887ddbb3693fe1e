"""Dense attention written the textbook way: the oracles the Tucker forms must reproduce."""

import torch

from tucker_serve.rope import apply_rope, rope_cos_sin


def _causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    T = scores.shape[-1]
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1)


def gqa_attention(x, Wq, Wk, Wv, Wo, inv_freq, positions):
    """Llama attention with per-head rotate-half RoPE; x (T, d), Wq (H, d, D), Wk/Wv (G, d, D), Wo (H, D, d)."""
    H, _, D = Wq.shape
    rep = H // Wk.shape[0]
    cos, sin = rope_cos_sin(inv_freq, positions)  # (T, D/2)
    out = torch.zeros_like(x)
    for h in range(H):
        g = h // rep
        q = apply_rope(x @ Wq[h], cos, sin)
        k = apply_rope(x @ Wk[g], cos, sin)
        a = _causal_softmax(q @ k.T / D**0.5)
        out = out + a @ (x @ Wv[g]) @ Wo[h]
    return out


def mla_attention(x, W_dq, W_uq, W_dkv, W_uk, W_uv, Wo, inv_freq, positions):
    """MLA with RoPE on the latent: the up-projected query is absorbed into the latent space,
    both are rotated there, and values are read from the unrotated latent."""
    D = W_uq.shape[-1]
    c_q, c_kv = x @ W_dq, x @ W_dkv
    cos, sin = rope_cos_sin(inv_freq, positions)
    k = apply_rope(c_kv, cos, sin)
    out = torch.zeros_like(x)
    for h in range(W_uq.shape[0]):
        q = apply_rope(c_q @ W_uq[h] @ W_uk[h].T, cos, sin)
        a = _causal_softmax(q @ k.T / D**0.5)
        out = out + a @ (c_kv @ W_uv[h]) @ Wo[h]
    return out
