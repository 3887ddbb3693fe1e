"""Serving form of a Tucker layer: its factors folded into MQA projections (one KV head).

The plugin loads these once per layer: per-head latent query maps U2 B_h stacked into the query
part of one QKV projection, and the output maps Ut2 Bt_h side by side in one output projection.
With `block`, head h's core reads (and writes) only its own slice of the shared projection.
"""

from __future__ import annotations

import torch


def fold_query(u2: torch.Tensor, bias: torch.Tensor | None, core: torch.Tensor,
               block: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """U2^T (r2, d), its bias (r2,) or None, cores B_h (H, q_in, r3) -> weight (H * r3, d), bias (H * r3,)."""
    heads, q_in, _ = core.shape
    core, u2 = core.float(), u2.float()
    if block:
        weight = torch.einsum("hid,hir->hrd", u2.view(heads, q_in, -1), core)
    else:
        weight = torch.einsum("id,hir->hrd", u2, core)
    if bias is not None:
        bias = torch.einsum("hi,hir->hr", bias.float().view(heads, -1), core) if block else \
            torch.einsum("i,hir->hr", bias.float(), core)
        bias = bias.flatten()
    return weight.flatten(0, 1), bias


def fold_output(ut2: torch.Tensor, core: torch.Tensor, block: bool) -> torch.Tensor:
    """Ut2 (d, rt2), cores Bt_h (H, o_out, rt3) -> weight (d, H * rt3)."""
    heads = core.shape[0]
    ut2, core = ut2.float(), core.float()
    if block:
        return torch.einsum("dho,hos->dhs", ut2.view(ut2.shape[0], heads, -1), core).flatten(1)
    return torch.einsum("do,hos->dhs", ut2, core).flatten(1)
