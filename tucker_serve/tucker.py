"""Tucker factors of the two attention weight tensors, exact constructors and truncated HOSVD.

Dense attention weights use per-head shapes: Wq (H, d, D), Wk and Wv (G, d, D), Wo (H, D, d);
head h reads KV group h // (H // G). The tensors are T[h] = Wq_h Wk_g^T and Tt[h] = (Wv_g Wo_h)^T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tucker_serve.config import TuckerConfig
from tucker_serve.rope import basis_freqs, complex_basis_map, identity_bases


@dataclass(frozen=True)
class TuckerFactors:
    """T = core x1 U1 x2 U2 x3 U3 and Tt = core_t x1 Ut1 x2 Ut2 x3 Ut3 (Ut3 None: shared latent)."""

    core: torch.Tensor  # (r1, r2, r3)
    U1: torch.Tensor  # (H, r1)
    U2: torch.Tensor  # (d, r2)
    U3: torch.Tensor  # (d, r3)
    core_t: torch.Tensor  # (rt1, rt2, rt3)
    Ut1: torch.Tensor  # (H, rt1)
    Ut2: torch.Tensor  # (d, rt2)
    Ut3: torch.Tensor | None  # (d, rt3)

    def config(self, rope: bool = True) -> TuckerConfig:
        r1, r2, r3 = self.core.shape
        rt1, rt2, rt3 = self.core_t.shape
        return TuckerConfig(
            hidden_size=self.U2.shape[0], num_heads=self.U1.shape[0], r1=r1, r2=r2, r3=r3,
            rt1=rt1, rt2=rt2, rt3=rt3, rope=rope, shared_latent=self.Ut3 is None,
        )

    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head cores B (H, r2, r3) and Bt (H, rt2, rt3): the core contracted with the head factor."""
        B = torch.einsum("ha,abc->hbc", self.U1, self.core)
        Bt = torch.einsum("ha,abc->hbc", self.Ut1, self.core_t)
        return B, Bt

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense (H, d, d) tensors T and Tt these factors represent (for tests and error checks)."""
        Ut3 = self.U3 if self.Ut3 is None else self.Ut3
        return (
            reconstruct(self.core, (self.U1, self.U2, self.U3)),
            reconstruct(self.core_t, (self.Ut1, self.Ut2, Ut3)),
        )


def attention_tensors(Wq, Wk, Wv, Wo) -> tuple[torch.Tensor, torch.Tensor]:
    """T (H, d, d) with T[h] = Wq_h Wk_g^T and Tt (H, d, d) with Tt[h] = (Wv_g Wo_h)^T."""
    rep = Wq.shape[0] // Wk.shape[0]
    Wk, Wv = Wk.repeat_interleave(rep, 0), Wv.repeat_interleave(rep, 0)
    T = torch.einsum("hqi,hki->hqk", Wq, Wk)
    Tt = torch.einsum("hvi,hio->hov", Wv, Wo)
    return T, Tt


def _block_selector(heads: int, width: int, dtype) -> torch.Tensor:
    """E (H, H*width, width): E[h] picks head h's block out of a stack of H blocks."""
    eye = torch.eye(heads * width, dtype=dtype)
    return eye.view(heads, width, heads * width).transpose(1, 2).contiguous()


def from_gqa(Wq, Wk, Wv, Wo, inv_freq: torch.Tensor) -> tuple[TuckerFactors, torch.Tensor]:
    """Exact Tucker form of MHA/GQA/MQA with per-head RoPE (G = H, 1 < G < H, G = 1).

    Keys go to the RoPE-structured latent of docs/design.md s2 with identity bases, so latent RoPE with
    the returned per-pair frequencies reproduces per-head RoPE. Ranks (H, H*D, G*D, H, H*D, G*D).
    """
    H, d, D = Wq.shape
    G = Wk.shape[0]
    rep = H // G
    bases = identity_bases(G, D, dtype=torch.complex128 if Wq.dtype == torch.float64 else torch.complex64)
    A = complex_basis_map(bases, D).to(Wq.dtype)  # (G, D, G*D): head coords -> latent
    U2 = Wq.permute(1, 0, 2).reshape(d, H * D)
    U3 = torch.einsum("gdi,gir->dr", Wk, A)
    core = torch.einsum("hqi,hir->hqr", _block_selector(H, D, Wq.dtype), A.repeat_interleave(rep, 0))
    Ut3 = Wv.permute(1, 0, 2).reshape(d, G * D)
    Ut2 = Wo.permute(2, 0, 1).reshape(d, H * D)
    out_sel = _block_selector(H, D, Wq.dtype)  # (H, H*D, D)
    val_sel = _block_selector(G, D, Wq.dtype).repeat_interleave(rep, 0)  # (H, G*D, D)
    core_t = torch.einsum("hoi,hvi->hov", out_sel, val_sel)
    eye = torch.eye(H, dtype=Wq.dtype)
    factors = TuckerFactors(core, eye, U2, U3, core_t, eye.clone(), Ut2, Ut3)
    return factors, basis_freqs(bases, inv_freq)


def from_mla(W_dq, W_uq, W_dkv, W_uk, W_uv, Wo) -> TuckerFactors:
    """Exact Tucker form of MLA with RoPE coupled to the latent (the paper's simplification).

    W_dq (d, dq), W_uq (H, dq, D), W_dkv (d, dc), W_uk and W_uv (H, dc, D), Wo (H, D, d).
    U2 = W_DQ, U3 = W_DKV, core slices W_UQ_h W_UK_h^T; values read the same latent (shared).
    """
    H = W_uq.shape[0]
    d = W_dq.shape[0]
    core = torch.einsum("hqi,hki->hqk", W_uq, W_uk)
    core_t = torch.einsum("hvi,hio->hov", W_uv, Wo)  # (H, d, dc)
    eye = torch.eye(H, dtype=W_dq.dtype)
    return TuckerFactors(core, eye, W_dq, W_dkv, core_t, eye.clone(), torch.eye(d, dtype=W_dq.dtype), None)


def unfold(T: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-n unfolding: rows index mode n, columns the remaining modes."""
    return T.movedim(mode, 0).reshape(T.shape[mode], -1)


def mode_product(T: torch.Tensor, U: torch.Tensor, mode: int) -> torch.Tensor:
    """T x_n U: contract T's mode n with U's columns (U has shape (new, old))."""
    return torch.tensordot(U, T.movedim(mode, 0), dims=([1], [0])).movedim(0, mode)


def reconstruct(core: torch.Tensor, factors) -> torch.Tensor:
    """core x1 U1 x2 U2 x3 U3."""
    out = core
    for mode, U in enumerate(factors):
        out = mode_product(out, U, mode)
    return out


def hosvd(T: torch.Tensor, ranks, iters: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Truncated HOSVD of a 3-tensor (orthonormal factors), refined by `iters` HOOI sweeps."""
    factors = [torch.linalg.svd(unfold(T, n), full_matrices=False)[0][:, :r] for n, r in enumerate(ranks)]
    for _ in range(iters):
        for n, r in enumerate(ranks):
            rest = T
            for m, U in enumerate(factors):
                if m != n:
                    rest = mode_product(rest, U.T, m)
            factors[n] = torch.linalg.svd(unfold(rest, n), full_matrices=False)[0][:, :r]
    core = T
    for n, U in enumerate(factors):
        core = mode_product(core, U.T, n)
    return core, factors


def factorize(T: torch.Tensor, Tt: torch.Tensor, config: TuckerConfig, iters: int = 0) -> TuckerFactors:
    """Truncated HOSVD (HOOI with iters > 0) of both attention tensors at the config's ranks."""
    if config.shared_latent:
        raise ValueError("HOSVD factorizes K and V separately; shared_latent needs a trained model")
    core, (U1, U2, U3) = hosvd(T, config.pre_ranks, iters)
    core_t, (Ut1, Ut2, Ut3) = hosvd(Tt, config.post_ranks, iters)
    return TuckerFactors(core, U1, U2, U3, core_t, Ut1, Ut2, Ut3)
