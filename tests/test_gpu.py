"""The CUDA paths against the float64 PyTorch reference on the CPU (skipped without a GPU; run by
bench/gpu_check.sh on a lent GPU machine): the TUCKER backend's dispatch (Triton decode, prefill) on
mixed batches with 16-bit and fp8 caches, shared latents, and the reference model's attention
(flash-attention when installed, else SDPA); conversion's calibration and measured widths,
evaluation's perplexity and teacher forcing, and conversion and healing of a bfloat16 checkpoint, on
CUDA against the same on the CPU."""

import pytest
import torch

from helpers import BS, H, R3, RT3, TINY_SOURCE, make_batch, relative
from tucker_bench.tiny import offline_source
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


def test_calibration_and_layer_measurement_on_cuda_match_the_cpu():
    import transformers as tf

    from tucker_serve.allocate import measure, text_probe
    from tucker_serve.calibrate import AttentionShape, collect
    from tucker_serve.convert import ConvertOptions, convert_layer

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_SOURCE)).eval()
    s = AttentionShape.from_config(model.config.to_dict())
    ids = torch.randint(0, TINY_SOURCE["vocab_size"], (2048,), generator=torch.Generator().manual_seed(1))
    results = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        stats = collect(model, ids, 512, progress=False)
        assert stats[0].value_gram.device.type == "cpu"  # the statistics come back to the CPU

        def tensors(i, r3, rt3):
            out, freqs, _ = convert_layer(model.model.layers[i].self_attn, stats[i], s, r3, rt3, ConvertOptions())
            return out, freqs

        costs = measure(model, text_probe(ids, 256, 2), tensors, (16, 16), s.groups * s.head_dim, progress=False)
        results[device] = stats, costs
    (cpu, cpu_costs), (gpu, gpu_costs) = results["cpu"], results["cuda"]
    for a, b in zip(cpu, gpu):
        assert a.tokens == b.tokens
        for name in ("key_cov", "key_attn_cov", "query_energy", "value_gram", "out_gram"):
            x, y = getattr(b, name), getattr(a, name)
            x, y = (torch.view_as_real(x), torch.view_as_real(y)) if x.is_complex() else (x, y)
            assert relative(x, y) <= 1e-4, name
    for a, b in zip(cpu_costs, gpu_costs):  # KL of each layer truncated at each width
        for w in a.key:
            assert b.key[w] == pytest.approx(a.key[w], rel=1e-2, abs=1e-5)
        for w in a.value:
            assert b.value[w] == pytest.approx(a.value[w], rel=1e-2, abs=1e-5)


def test_perplexity_and_teacher_forcing_on_cuda_match_the_cpu():
    import transformers as tf

    from tucker_serve.chat import teacher_forced
    from tucker_serve.evaluate import perplexity

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_SOURCE)).eval()
    other = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_SOURCE)).eval()
    windows = torch.randint(0, TINY_SOURCE["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(1))
    pairs = [(windows[0, :20].tolist(), windows[0, 20:30].tolist()), (windows[1, :7].tolist(), windows[1, 7:9].tolist())]
    got = {}
    for device in ("cpu", "cuda"):
        lm, teacher = model.to(device), other.to(device)
        got[device] = (perplexity(lambda ids: lm(ids.to(device)).logits, windows, progress=False).perplexity,
                       teacher_forced(lambda ids: lm(ids.to(device)).logits, lambda ids: teacher(ids.to(device)).logits,
                                      pairs, progress=False))
    assert got["cuda"][0] == pytest.approx(got["cpu"][0], rel=1e-4)
    assert got["cuda"][1]["kl"] == pytest.approx(got["cpu"][1]["kl"], rel=1e-3)
    assert got["cuda"][1]["answer_tokens"] == got["cpu"][1]["answer_tokens"] == 12


def test_conversion_and_healing_on_cuda_follow_the_cpu(tmp_path, monkeypatch):
    """A bfloat16 tiny Llama converts on CUDA as on the CPU, healing's float32 steps on CUDA follow the
    CPU's losses, and with bfloat16 autocast on CUDA they stay within its rounding."""
    from dataclasses import replace

    from tucker_serve.convert import ConvertOptions, convert
    from tucker_serve.heal import HealOptions, heal

    monkeypatch.setenv("TUCKER_SERVE_CACHE", str(tmp_path / "cache"))  # one teacher pool, read back by the second run
    source, text = offline_source(tmp_path, TINY_SOURCE)
    opt = ConvertOptions(kv_ratio=2.0, calib_text=str(text), calib_tokens=1024, calib_window=256)
    reports = {d: convert(str(source), tmp_path / f"2x-{d}", opt, progress=False, device=d) for d in ("cpu", "cuda")}
    assert reports["cuda"]["device"].startswith("cuda") and reports["cuda"]["dtype"] == "bfloat16"
    for a, b in zip(reports["cpu"]["layers"], reports["cuda"]["layers"]):
        assert b["key_energy"] == pytest.approx(a["key_energy"], rel=1e-4)
        assert b["value_energy"] == pytest.approx(a["value_energy"], rel=1e-4)
    heal_opt = HealOptions(steps=4, batch=4, seq=64, chat=0, text=str(text), teacher_windows=16, eval_tokens=0,
                           bf16=False)
    healed = {d: heal(tmp_path / "2x-cpu", tmp_path / f"healed-{d}", heal_opt, progress=False, device=d)["healing"]
              for d in ("cpu", "cuda")}
    assert healed["cuda"]["device"].startswith("cuda")
    torch.testing.assert_close(torch.tensor(healed["cuda"]["kl_per_step"]), torch.tensor(healed["cpu"]["kl_per_step"]),
                               rtol=1e-3, atol=1e-6)
    bf16 = heal(tmp_path / "2x-cpu", tmp_path / "healed-bf16", replace(heal_opt, bf16=True), progress=False,
                device="cuda")["healing"]  # the same windows in the same order, bfloat16 rounding
    torch.testing.assert_close(torch.tensor(bf16["kl_per_step"]), torch.tensor(healed["cuda"]["kl_per_step"]),
                               rtol=5e-2, atol=1e-3)
