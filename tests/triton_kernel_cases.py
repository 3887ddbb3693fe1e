"""The Triton paged decode kernel against the PyTorch reference, run by Triton's CPU interpreter.

Run through tests/test_triton_decode.py, in a process of its own: TRITON_INTERPRET must be set
before Triton is first imported, and other tests import it (through vLLM) without.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported (decorated) anywhere

import pytest
import torch

from helpers import BS, H, R3, RT3, make_batch, relative
from tucker_serve.ops.paged import decode_attention
from tucker_serve.ops.triton_decode import available, paged_decode, split_work

pytestmark = pytest.mark.skipif(not available(torch.device("cpu")), reason="triton is not installed")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float8_e4m3fn: 1e-5, torch.float8_e5m2: 1e-5}
# relative to the largest output entry; fp8 caches are compared with the reference reading the same fp8 cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_matches_reference_on_ragged_shuffled_blocks(dtype, splits):
    # lengths: 1 token, exactly one block, many blocks (with a partial last block); r3 != rt3
    ctx = [1, BS, 5 * BS + 3, 2 * BS]
    cache, table, _, _, _, _ = make_batch(ctx, [1] * len(ctx), torch.float32, seed=11)
    cache = cache.to(dtype)
    q_dtype = torch.float32 if dtype.itemsize == 1 else dtype  # fp8 is a cache type: queries stay wide
    q = torch.randn(len(ctx), H, R3, generator=torch.Generator().manual_seed(12)).to(q_dtype)
    seq = torch.tensor(ctx, dtype=torch.int32)
    want = decode_attention(q.float(), cache.float(), table, seq, 0.4)
    got = paged_decode(q, cache, table, seq, 0.4, num_splits=splits, max_len=max(ctx))
    assert got.shape == (len(ctx), H, RT3) and got.dtype == q_dtype
    assert relative(got, want) <= TOL[dtype]


def test_empty_context_gives_zeros_and_no_nan():
    cache, table, _, _, _, _ = make_batch([BS, 3], [1, 1], torch.float32, seed=13)
    q = torch.randn(2, H, R3)
    got = paged_decode(q, cache, table, torch.tensor([0, 3], dtype=torch.int32), 0.4, num_splits=2)
    assert torch.equal(got[0], torch.zeros(H, RT3))
    assert relative(got[1], decode_attention(q[1:], cache, table[1:], torch.tensor([3]), 0.4)[0]) <= 1e-5


def test_shared_latent_rotates_keys_at_read_time():
    g = torch.Generator().manual_seed(14)
    cache = torch.randn(6, 1, BS, R3, generator=g)
    table = torch.randperm(6, generator=g)[:5].view(1, 5).to(torch.int32)
    freqs = torch.rand(R3 // 2, generator=g, dtype=torch.float64) * 0.3
    q = torch.randn(1, H, R3, generator=g)
    seq = torch.tensor([4 * BS + 5], dtype=torch.int32)
    want = decode_attention(q, cache, table, seq, 0.4, latent_freqs=freqs)
    assert relative(paged_decode(q, cache, table, seq, 0.4, latent_freqs=freqs, num_splits=2), want) <= 1e-5


def test_shared_latent_angles_are_exact_far_into_the_context():
    # position ~8k with a fast frequency: float32 angles would be off by ~5e-4 rad
    g = torch.Generator().manual_seed(15)
    blocks = 8192 // BS + 1
    cache = torch.randn(blocks, 1, BS, R3, generator=g, dtype=torch.float64)
    table = torch.arange(blocks, dtype=torch.int32)[None]
    freqs = torch.linspace(1.0, 1e-3, R3 // 2, dtype=torch.float64)
    q = torch.randn(1, H, R3, generator=g, dtype=torch.float64)
    seq = torch.tensor([8192 + 5], dtype=torch.int32)
    want = decode_attention(q, cache, table, seq, 0.4, latent_freqs=freqs)
    got = paged_decode(q.float(), cache.float(), table, seq, 0.4, latent_freqs=freqs, num_splits=4)
    assert relative(got, want) <= 2e-5


def test_splits_follow_the_longest_context_not_the_padded_block_table():
    cache, table, _, _, _, _ = make_batch([3, BS + 1], [1, 1], torch.float32, seed=16)
    padded = torch.cat([table, torch.zeros(2, 100, dtype=table.dtype)], 1)  # vLLM pads to max_model_len
    q = torch.randn(2, H, R3, generator=torch.Generator().manual_seed(17))
    seq = torch.tensor([3, BS + 1], dtype=torch.int32)
    want = decode_attention(q, cache, table, seq, 0.4)
    assert relative(paged_decode(q, cache, padded, seq, 0.4, max_len=BS + 1), want) <= 1e-5
    assert split_work(2, 2) == (2, 1)  # 2 programs of one block each, not 64 over the padding
    assert split_work(2, 102) == (64, 2)
