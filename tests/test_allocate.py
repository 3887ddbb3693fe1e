"""Per-layer latent widths: the measured widths, the convex cost curves, the greedy allocation under the
byte budget, and on the real SmolLM2 that measured widths beat uniform ones at the same bytes."""

import json

import pytest
import torch

from helpers import kl_per_token
from tucker_serve.allocate import (SCORED, LayerCosts, allocate, allocate_equal, convex_steps, copy_probe, cost_at,
                                   measured_widths, text_probe)


def test_measured_widths_lie_around_the_uniform_width_below_full_rank():
    assert measured_widths(96, 192, 2) == [48, 96, 144]
    assert measured_widths(160, 192, 2) == [80, 160]  # 240 is past full rank
    assert measured_widths(7, 192, 1) == [4, 7, 10]
    assert all(w % 2 == 0 for w in measured_widths(50, 192, 2))


def test_the_key_share_splits_each_layers_latent_and_needs_a_ratio():
    from tucker_serve.calibrate import AttentionShape
    from tucker_serve.checkpoint import ModelError
    from tucker_serve.convert import ConvertOptions, choose_ranks

    s = AttentionShape.from_config({"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9,
                                    "num_key_value_heads": 3, "head_dim": 64})  # SmolLM2-135M: 384 per token
    assert choose_ranks(s, ConvertOptions(kv_ratio=1.5)) == (128, 128)  # half and half up to 3x
    assert choose_ranks(s, ConvertOptions(kv_ratio=1.5, key_share=0.375)) == (96, 160)
    assert choose_ranks(s, ConvertOptions(kv_ratio=1.2, key_share=0.375)) == (120, 192)  # values at full rank
    with pytest.raises(ModelError, match="key_share=1.0 must lie strictly between 0 and 1"):
        choose_ranks(s, ConvertOptions(kv_ratio=1.5, key_share=1.0))
    with pytest.raises(ModelError, match="key_share .* shares out the latent of kv_ratio"):
        choose_ranks(s, ConvertOptions(full_rank=True, key_share=0.4))


def test_cost_steps_follow_the_lower_convex_hull_down_to_zero_at_full_rank():
    # 96 -> 1.3 lies above the chord from 48 to 144 (1.1 there): the hull skips it.
    steps = convex_steps({48: 2.0, 96: 1.3, 144: 0.2}, 192, 2)
    assert sum(n for _, n in steps) == 192 - 48
    gains = [g for g, _ in steps]
    assert gains == sorted(gains, reverse=True)  # convex: each step removes no more than the one before
    assert gains[0] == pytest.approx((2.0 - 0.2) / 96) and gains[-1] == pytest.approx(0.2 / 48)


def test_the_budget_goes_to_the_layers_whose_truncation_costs_most():
    cheap = LayerCosts({4: 0.01, 8: 0.005}, {4: 0.01, 8: 0.005})
    dear = LayerCosts({4: 1.0, 8: 0.5}, {4: 0.2, 8: 0.1})
    widths = allocate([cheap, dear, cheap], budget=3 * 16, full=16)
    assert sum(a + b for a, b in widths) <= 48
    assert widths[1][0] == 16  # the dear keys go to full rank first
    assert widths[1][0] + widths[1][1] > widths[0][0] + widths[0][1]
    assert all(a >= 4 and b >= 4 and a % 2 == 0 for a, b in widths)
    with pytest.raises(ValueError, match="cannot give every layer its narrowest"):
        allocate([cheap, dear, cheap], budget=20, full=16)


def test_equal_widths_are_head_sizes_and_the_least_cost_choice_under_the_budget():
    curve = {48: 1.0, 96: 0.4, 144: 0.1}
    assert cost_at(curve, 192, 48) == 1.0
    assert cost_at(curve, 192, 72) == pytest.approx(0.7) and cost_at(curve, 192, 192) == 0.0
    cheap = LayerCosts({48: 0.01, 96: 0.005, 144: 0.001}, {48: 0.01, 96: 0.005, 144: 0.001})
    dear = LayerCosts({48: 1.0, 96: 0.4, 144: 0.1}, {48: 1.0, 96: 0.4, 144: 0.1})
    widths = allocate_equal([cheap, dear], budget=2 * 192, full=192)
    assert all(a == b for a, b in widths) and sum(2 * a for a, _ in widths) <= 384
    assert widths == [(64, 64), (128, 128)]  # the dear layer wider; 48 and 32 are not offered (below measured)
    with pytest.raises(ValueError, match="cannot give every layer a head size"):
        allocate_equal([cheap, dear], budget=200, full=192)


def test_probes_score_text_at_every_fourth_position_and_copy_windows_on_their_repeat():
    ids = torch.arange(10_000)
    text = text_probe(ids, 1024, 3)
    assert text.windows.shape == (3, 1024) and text.windows[-1, -1] == 9999  # spread to the end
    assert text.scored.tolist() == list(range(0, 1024, SCORED))
    copy = copy_probe(ids, 4096, passage=64)
    assert copy.windows.shape == (2, 4096)
    body = 4096 - 64
    for window, at in zip(copy.windows, (body // 64, body // 2)):
        assert torch.equal(window[body:], window[at: at + 64])  # the passage, repeated at the end
    assert torch.equal(copy.windows[1][:body], ids[body: 2 * body])  # two separate texts
    assert copy.scored.tolist() == list(range(body, 4095))  # predicting the repeat's 2nd token on
    with pytest.raises(ValueError, match="need 8064 calibration tokens"):
        copy_probe(ids[:5000], 4096)
    assert (LayerCosts({4: 1.0}, {4: 2.0}) + LayerCosts({4: 0.5}, {4: 0.25})) == LayerCosts({4: 1.5}, {4: 2.25})


@pytest.mark.slow
def test_measured_widths_beat_uniform_widths_on_smollm2(converted):
    """The default model's per-layer widths (1.2x, measured) hold more of the source's next-token
    distribution on held-out text than uniform widths of the same bytes (the session's 1.2x)."""
    from tucker_server.launcher import DEFAULT_CONVERSION
    from tucker_serve.evaluate import text_windows
    from tucker_serve.model import TuckerLlama
    from tucker_serve.sources import load_hf_model, load_tokenizer, resolve
    from tucker_serve.text import load_text

    assert DEFAULT_CONVERSION.startswith("1.2@measured")
    source = resolve("smollm2-135m")
    windows = text_windows(load_tokenizer(source.folder), load_text("wiki", "eval"), 4 * 512, 512)
    with torch.no_grad():
        teacher = load_hf_model(source.folder)(windows).logits.log_softmax(-1)
    kl, reports = {}, {}
    for mode, folder in (("uniform", converted(1.2)), ("measured", converted(DEFAULT_CONVERSION))):
        with torch.no_grad():
            student = TuckerLlama.from_pretrained(folder)(windows).log_softmax(-1)
        kl[mode] = kl_per_token(teacher, student)
        reports[mode] = json.loads((folder / "tucker_report.json").read_text())
    measured, uniform = reports["measured"], reports["uniform"]
    assert isinstance(measured["key_rank"], list) and (uniform["key_rank"], uniform["value_rank"]) == (160, 160)
    assert len(set(measured["value_rank"])) > 1  # the widths differ by layer
    assert measured["compression_ratio"] == pytest.approx(1.2, abs=1e-3) == uniform["compression_ratio"]
    # Measured when written: 0.060 against 0.075 nats per token (docs/quality.md, "The default model").
    assert kl["measured"] < 0.9 * kl["uniform"], kl
