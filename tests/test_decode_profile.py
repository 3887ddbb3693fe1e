"""bench/decode_profile.py's arithmetic: multiply-adds per decoded token of each part, from the shapes."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("decode_profile", Path(__file__).parents[1] / "bench" / "decode_profile.py")
decode_profile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(decode_profile)

SMOLLM2 = {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}


def test_source_and_latent_attention_arithmetic_per_decoded_token():
    source = decode_profile.arithmetic(SMOLLM2, ctx=1024)
    tucker = decode_profile.arithmetic({**SMOLLM2, "tucker": {"r3": 160, "rt3": 160}}, ctx=1024)
    assert source["self_attn.qkv_proj"] == 30 * 576 * (9 + 6) * 64
    assert tucker["self_attn.qkv_proj"] == 30 * 576 * (9 * 160 + 320)
    # every head reads the whole latent (320 numbers per cached token) where a source head reads 128
    assert source["self_attn.attn"] == 30 * 9 * 1024 * 128 and tucker["self_attn.attn"] == 30 * 9 * 1024 * 320
    assert source["mlp"] == tucker["mlp"] == 30 * 3 * 576 * 1536 and source["logits"] == 49152 * 576


def test_per_layer_widths_sum_layer_by_layer():
    """A model converted with --layer-widths measured records r3 and rt3 per layer."""
    r3, rt3 = [96, 192] + [160] * 28, [48, 144] + [160] * 28
    tucker = decode_profile.arithmetic({**SMOLLM2, "tucker": {"r3": r3, "rt3": rt3}}, ctx=2048)
    uniform = decode_profile.arithmetic({**SMOLLM2, "tucker": {"r3": 160, "rt3": 160}}, ctx=2048)
    assert tucker["self_attn.attn"] == 9 * 2048 * (sum(r3) + sum(rt3))
    assert tucker["self_attn.o_proj"] == 9 * 576 * sum(rt3)
    assert uniform["self_attn.attn"] - tucker["self_attn.attn"] == 9 * 2048 * ((320 - 96 - 48) - (192 + 144 - 320))
