"""The byte formulas against the reference figures of docs/design.md s1 (GPT-2 small, bf16, MB = 1e6 B)."""

import pytest

from tucker_serve import cache_layout as cl

D, H, L, N = 768, 12, 12, 1024
MB = 1e6


def test_attention_parameters_match_gpt2_reference():
    mha = cl.param_bytes(cl.gqa_params(D, H, H, D // H), L, "bfloat16") / MB
    mla = cl.param_bytes(cl.mla_params(D, H, D // H, kv_lora_rank=128, q_lora_rank=128), L, "bfloat16") / MB
    tucker = cl.param_bytes(cl.tucker_params(D, H, (8, 128, 64)), L, "bfloat16") / MB
    assert mha == pytest.approx(56.62, abs=0.05)
    assert mla == pytest.approx(26.00, abs=0.05)
    assert tucker == pytest.approx(10.24, abs=0.05)


def test_kv_cache_bytes_match_gpt2_reference():
    mha = cl.kv_cache_bytes(cl.mha_kv_width(H, D // H), L, N, "bfloat16") / MB
    mla = cl.kv_cache_bytes(cl.mla_kv_width(128), L, N, "bfloat16") / MB
    tucker = cl.kv_cache_bytes(cl.tucker_kv_width(64, 64), L, N, "bfloat16") / MB
    assert mha == pytest.approx(37.74, abs=0.05)
    assert mla == pytest.approx(3.14, abs=0.05)
    assert tucker == pytest.approx(3.14, abs=0.05)


def test_widths_of_each_scheme():
    assert cl.gqa_kv_width(3, 64) == 384  # SmolLM2-135M
    assert cl.gqa_kv_width(1, 64) == 128  # MQA
    assert cl.mla_kv_width(512, 64) == 576  # DeepSeek-V2
    assert cl.tucker_kv_width(96, 96) == 192
    assert cl.tucker_kv_width(96, 96, shared_latent=True) == 96
    assert cl.compression_ratio(384, 192) == 2.0


def test_shared_latent_drops_the_value_factor():
    separate = cl.tucker_params(D, H, (8, 128, 64))
    shared = cl.tucker_params(D, H, (8, 128, 64), shared_latent=True)
    assert separate - shared == D * 64


def test_capacity_and_concurrency_count_whole_blocks():
    per_token = cl.kv_bytes_per_token(192, 30, "float32")  # 23,040 B
    assert per_token == 23040
    assert cl.capacity_tokens(per_token * 100 + 5, 192, 30, "float32", block_size=16) == 96
    assert cl.max_concurrency(1024, 100, block_size=16) == pytest.approx(1024 / 112)


@pytest.mark.parametrize("dtype,size", [("float32", 4), ("torch.bfloat16", 2), ("fp8", 1)])
def test_dtype_bytes(dtype, size):
    assert cl.dtype_bytes(dtype) == size


def test_unknown_dtype_is_rejected():
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        cl.dtype_bytes("int3")


def test_layout_of_a_tucker_config():
    from helpers import RANKS, tiny_config

    layout = cl.model_layout(tiny_config(), "float32")
    assert (layout.width, layout.source_width, layout.num_layers) == (32, 128, 2)  # r3 + rt3 = 12 + 20
    assert layout.bytes_per_token == 2 * 32 * 4 and layout.compression_ratio == 4.0
    shared = cl.model_layout(tiny_config(shared_latent=True), "bfloat16")
    assert shared.width == 12 and shared.bytes_per_token_per_layer == 24
    mixed = cl.model_layout(tiny_config(ranks=dict(RANKS, r3=[12, 8], rt3=[20, 4])), "float32")
    assert mixed.widths == (32, 12) and mixed.width == 22 and mixed.bytes_per_token == 44 * 4
    assert mixed.compression_ratio == 2 * 128 / 44


def test_layout_of_a_source_config_is_its_gqa_or_mla_cache():
    smollm2 = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3}
    layout = cl.model_layout(smollm2, "fp8")
    assert (layout.width, layout.source_width, layout.compression_ratio) == (384, 384, 1.0)
    assert layout.bytes_per_token == 30 * 384
    explicit_head_dim = {**smollm2, "head_dim": 128}
    assert cl.model_layout(explicit_head_dim, "float32").width == 2 * 3 * 128
    mla = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "kv_lora_rank": 512,
           "qk_rope_head_dim": 64}
    assert cl.model_layout(mla, "bfloat16").width == 576


def test_folded_attention_weights_are_what_the_serving_fold_builds():
    import torch

    from tucker_serve.fold import fold_output, fold_query

    d, heads, r2, r3, rt2, rt3 = 48, 4, 48, 10, 48, 6
    query, _ = fold_query(torch.randn(r2, d), None, torch.randn(heads, r2, r3), block=False)
    output = fold_output(torch.randn(d, rt2), torch.randn(heads, rt2, rt3), block=False)
    latent_maps = r3 * d + rt3 * d  # the latent key and value rows of the QKV projection
    assert cl.folded_attention_params(d, heads, r3, rt3) == query.numel() + output.numel() + latent_maps
    assert cl.folded_attention_params(d, heads, r3, r3, shared_latent=True) == d * (2 * heads * r3 + r3)
    # Llama-3-8B at 2x: each head's query and output are 512 wide instead of 128
    assert cl.folded_attention_params(4096, 32, 512, 512) == 4096 * (2 * 32 * 512 + 1024)


def test_a_decode_step_reads_the_weights_once_and_every_sequences_cache():
    assert cl.decode_bytes_per_step(1000, 10, context=50, batch=4) == 1000 + 4 * 50 * 10
