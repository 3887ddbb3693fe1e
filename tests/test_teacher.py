"""The source's outputs computed once for healing: the top-k KL, the pool kept on disk and grown on
demand, and batches that pass over the whole pool."""

import time
from types import SimpleNamespace

import pytest
import torch

from tucker_serve.heal import kl_loss
from tucker_serve.teacher import TeacherTargets, topk_kl

VOCAB = 40


class Bigram(torch.nn.Module):
    """A tiny real language model: next-token logits from the current token."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)))
        self.calls = 0

    def forward(self, ids):
        self.calls += 1
        return SimpleNamespace(logits=self.table[ids])


def top_of(logits: torch.Tensor, k: int):
    values, index = logits.log_softmax(-1).topk(k, -1)
    return values, index


def test_topk_kl_is_the_full_kl_at_full_k_and_a_lower_bound_below():
    g = torch.Generator().manual_seed(0)
    teacher, student = 3 * torch.randn(2, 5, VOCAB, generator=g), 3 * torch.randn(2, 5, VOCAB, generator=g)
    full = kl_loss(student, teacher).item()
    assert topk_kl(student, *top_of(teacher, VOCAB)).item() == pytest.approx(full, rel=1e-4)
    bounds = [topk_kl(student, *top_of(teacher, k)).item() for k in (1, 4, 16)]
    assert 0 <= bounds[0] and all(b <= full + 1e-5 for b in bounds)
    assert topk_kl(teacher, *top_of(teacher, 8)).item() == pytest.approx(0.0, abs=1e-5)
    s = student.clone().requires_grad_(True)
    topk_kl(s, *top_of(teacher, 8)).backward()
    assert s.grad.abs().sum() > 0


def test_the_pool_is_kept_read_back_and_grown_on_demand(tmp_path):
    teacher, path = Bigram(), tmp_path / "pool.pt"
    windows = torch.randint(0, VOCAB, (12, 6), generator=torch.Generator().manual_seed(1))
    first, reused = TeacherTargets.build(teacher, windows[:8], 5, path, batch=4, bf16=False, progress=False)
    assert reused == 0 and len(first) == 8 and teacher.calls == 2
    values, index = top_of(teacher.table[windows[:8]].detach(), 5)
    assert torch.equal(first.ids, index.to(torch.int32))
    assert torch.allclose(first.logp.float(), values, atol=1e-2)
    # a longer pool with the same first windows reads them back and computes only the rest
    grown, reused = TeacherTargets.build(teacher, windows, 5, path, batch=4, bf16=False, progress=False)
    assert reused == 8 and len(grown) == 12 and teacher.calls == 3
    assert torch.equal(grown.ids[:8], first.ids)
    # a shorter one is a prefix of what the file holds: no teacher at all
    again, reused = TeacherTargets.build(teacher, windows[:4], 5, path, batch=4, bf16=False, progress=False)
    assert reused == 4 and len(again) == 4 and teacher.calls == 3
    # other windows under the same file are recomputed, never served with the wrong targets
    other = (windows + 1) % VOCAB
    fresh, reused = TeacherTargets.build(teacher, other, 5, path, batch=4, bf16=False, progress=False)
    assert reused == 0 and teacher.calls == 6
    assert torch.equal(fresh.ids, top_of(teacher.table[other].detach(), 5)[1].to(torch.int32))


def test_a_passed_deadline_stops_the_pool_after_one_batch(tmp_path):
    teacher = Bigram()
    windows = torch.randint(0, VOCAB, (12, 6), generator=torch.Generator().manual_seed(2))
    pool, _ = TeacherTargets.build(teacher, windows, 5, None, batch=4, bf16=False, deadline=time.time() - 1,
                                   progress=False)
    assert len(pool) == 4 and torch.equal(pool.windows, windows[:4].to(torch.int32))


def test_batches_pass_over_the_whole_pool_before_repeating():
    windows = torch.arange(10)[:, None].repeat(1, 3)
    pool = TeacherTargets(windows, torch.zeros(10, 3, 2, dtype=torch.int32), torch.zeros(10, 3, 2))
    g = torch.Generator().manual_seed(0)
    drawn = [int(w[0]) for _ in range(5) for w in pool.sample(4, g)[0]]
    assert sorted(drawn[:10]) == sorted(drawn[10:]) == list(range(10))
