"""The paged latent attention of the CPU backend against a dense per-request reference."""

import pytest
import torch

from helpers import BS, H, R3, RT3, make_batch
from tucker_serve.ops.paged import PagedBatch, decode_attention, decode_routine, paged_attention, write_latent_cache

TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def dense(q, k, v, scale):
    """q (q_len, H, r3) are the last q_len of L tokens with keys k (L, r3), values v (L, rt3)."""
    q_len, ctx = q.shape[0], k.shape[0]
    scores = torch.einsum("qhr,lr->hql", q, k) * scale
    allowed = torch.arange(ctx)[None] <= torch.arange(ctx - q_len, ctx)[:, None]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hql,ls->qhs", probs, v)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paged_attention_matches_dense_on_ragged_mixed_batch(dtype):
    # decodes at 1 token, exactly one block and many blocks; a fresh prefill; a chunk over a prefix
    ctx_lens = [1, BS, 5 * BS + 3, 40, 70]
    q_lens = [1, 1, 1, 40, 29]
    cache, table, keys, values, q, qsl = make_batch(ctx_lens, q_lens, dtype)
    out = torch.full((q.shape[0], H, RT3), float("nan"), dtype=dtype)
    paged_attention(q, cache, PagedBatch.of(qsl, torch.tensor(ctx_lens, dtype=torch.int32), table), 0.3, out)
    for i in range(len(ctx_lens)):
        a, b = int(qsl[i]), int(qsl[i + 1])
        want = dense(q[a:b], keys[i], values[i], 0.3)
        assert (out[a:b] - want).abs().max().item() <= TOL[dtype] * want.abs().max().item()


def test_bfloat16_cache_decodes_within_its_rounding():
    # a bfloat16 cache decodes within one bfloat16 rounding of the exact result on the same stored
    # numbers (today in float32); rounding the scores to bfloat16, 1.4x faster on CPU alone, errs 9e-3
    ctx_lens = [1, BS, 5 * BS + 3, 40]
    cache, table, _, _, q, _ = make_batch(ctx_lens, [1] * 4, torch.float64, seed=5)
    cache16, q16 = cache.to(torch.bfloat16), (3 * q).to(torch.bfloat16)
    seq = torch.tensor(ctx_lens, dtype=torch.int32)
    got = decode_attention(q16, cache16, table, seq, 0.3)
    want = decode_attention(q16.double(), cache16.double(), table, seq, 0.3)  # the same stored numbers, exact
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 4e-3 * want.abs().max().item()


def test_padding_slots_are_not_written():
    cache = torch.zeros(2, 1, BS, R3 + RT3)
    k, v = torch.ones(3, R3), torch.ones(3, RT3)
    write_latent_cache(cache, k, v, torch.tensor([5, -1, 17]))
    rows = cache.view(-1, R3 + RT3)
    assert rows.abs().sum(1).nonzero().flatten().tolist() == [5, 17]


def test_junk_beyond_the_context_does_not_leak():
    cache, table, keys, values, q, qsl = make_batch([20], [1], torch.float64, seed=3)
    out = torch.empty(1, H, RT3, dtype=torch.float64)
    paged_attention(q, cache, PagedBatch.of(qsl, torch.tensor([20], dtype=torch.int32), table), 0.5, out)
    cache[table[0, 1].long(), 0, 4:] = 1e6  # block 1 holds tokens 16..19; the rest is not context
    again = torch.empty_like(out)
    paged_attention(q, cache, PagedBatch.of(qsl, torch.tensor([20], dtype=torch.int32), table), 0.5, again)
    assert torch.equal(out, again)


def test_a_batch_must_put_its_decodes_first():
    qsl = torch.tensor([0, 5, 6])
    with pytest.raises(ValueError, match="decodes"):
        PagedBatch.of(qsl, torch.tensor([5, 9]), torch.zeros(2, 1, dtype=torch.int32))
    assert PagedBatch.of(torch.tensor([0, 1, 2, 9]), torch.tensor([3, 30, 7]), torch.zeros(3, 2)).num_decodes == 2


def test_cpu_decodes_with_pytorch_even_under_the_triton_interpreter(monkeypatch):
    # TRITON_INTERPRET=1 makes the Triton kernel runnable on the CPU (its tests use it); the backend
    # still decodes CPU batches with PyTorch (tests/test_gpu.py checks the CUDA choice)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert decode_routine(torch.device("cpu")) is decode_attention
