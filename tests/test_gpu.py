"""The CUDA paths against the float64 PyTorch reference on the CPU (skipped without a GPU; run by
bench/gpu_check.sh on a lent GPU machine): the TUCKER backend's dispatch (Triton decode, prefill) on
mixed batches with 16-bit and fp8 caches, shared latents, and the reference model's attention
(flash-attention when installed, else SDPA)."""

import pytest
import torch

from helpers import BS, H, R3, RT3, make_batch, relative
from tucker_serve.ops.paged import PagedBatch, decode_routine, paged_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CACHE_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float8_e4m3fn: 2e-2, torch.float8_e5m2: 2e-2}


@pytest.mark.parametrize("cache_dtype", list(CACHE_TOL))
def test_backend_dispatch_matches_reference_on_a_mixed_batch(cache_dtype):
    from tucker_serve.ops.triton_decode import paged_decode

    assert decode_routine(torch.device("cuda")) is paged_decode
    ctx_lens, q_lens = [1, BS, 5 * BS + 3, 300, 40, 70], [1, 1, 1, 1, 40, 29]
    cache, table, _, _, q, qsl = make_batch(ctx_lens, q_lens, torch.float32)
    cache, q = cache.to(cache_dtype), q.to(torch.bfloat16)
    seq = torch.tensor(ctx_lens, dtype=torch.int32)
    want = torch.zeros(q.shape[0], H, RT3, dtype=torch.float64)
    paged_attention(q.double(), cache.double(), PagedBatch.of(qsl, seq, table), 0.3, want)
    query = q.cuda()
    batch = PagedBatch.of(qsl, seq.cuda(), table.cuda())
    out = torch.zeros(q.shape[0], H, RT3, dtype=torch.bfloat16, device="cuda")
    paged_attention(query, cache.cuda(), batch, 0.3, out, None, decode=decode_routine(query.device))
    assert relative(out, want) <= CACHE_TOL[cache_dtype]


def test_shared_latent_decode_on_the_gpu():
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(40, 1, BS, R3, generator=g)
    table = torch.randperm(40, generator=g)[:30].view(2, 15).to(torch.int32)
    freqs = torch.rand(R3 // 2, generator=g, dtype=torch.float64)
    q = torch.randn(2, H, R3, generator=g)
    seq = torch.tensor([15 * BS, 7], dtype=torch.int32)
    qsl = torch.tensor([0, 1, 2])
    want = torch.zeros(2, H, R3, dtype=torch.float64)
    paged_attention(q.double(), cache.double(), PagedBatch.of(qsl, seq, table), 0.4, want, freqs)
    out = torch.zeros(2, H, R3, device="cuda")
    paged_attention(q.cuda(), cache.cuda(), PagedBatch.of(qsl, seq.cuda(), table.cuda()), 0.4, out, freqs.cuda(),
                    decode=decode_routine(q.device))
    assert relative(out, want) <= 1e-4


@pytest.mark.parametrize("r3,rt3", [(96, 96), (54, 42), (12, 20)])
def test_reference_attention_on_the_gpu(r3, rt3):
    from tucker_serve.attention import latent_attention

    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 9, 300, r3, generator=g), torch.randn(2, 300, r3, generator=g), \
        torch.randn(2, 300, rt3, generator=g)
    want = latent_attention(q.double(), k.double(), v.double(), r3**-0.5)
    got = latent_attention(*(t.to(torch.bfloat16).cuda() for t in (q, k, v)), r3**-0.5)
    assert got.shape == want.shape and relative(got, want) <= 2e-2
