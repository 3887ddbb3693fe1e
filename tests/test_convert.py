"""Conversion of the real SmolLM2-135M: exact at full rank, sized as asked when compressed."""

import json

import pytest
import torch

from tucker_serve.checkpoint import ARCHITECTURE
from tucker_serve.evaluate import load_lm, perplexity, text_windows
from tucker_serve.model import TuckerLlama
from tucker_serve.sources import load_hf_model
from tucker_serve.text import load_text

pytestmark = pytest.mark.slow
SOURCE_KV_WIDTH = 384  # 2 x 3 KV heads x 64


@pytest.fixture(scope="module")
def source(smollm2):
    return load_hf_model(smollm2.folder)


@pytest.fixture(scope="module")
def wiki_windows(smollm2):
    from tucker_serve.sources import load_tokenizer

    return text_windows(load_tokenizer(smollm2.folder), load_text("wiki", "eval"), 2048, 512)


def test_full_rank_logits_equal_the_source_on_real_text(converted, source, wiki_windows):
    tucker = TuckerLlama.from_pretrained(converted("full"))
    with torch.no_grad():
        diff = (tucker(wiki_windows[:2]) - source(wiki_windows[:2]).logits).abs().max().item()
    assert diff <= 1e-3


def test_full_rank_perplexity_equals_the_source(converted, source, wiki_windows):
    tucker = TuckerLlama.from_pretrained(converted("full"))
    want = perplexity(lambda ids: source(ids).logits, wiki_windows, progress=False)
    got = perplexity(tucker, wiki_windows, progress=False)
    assert got.tokens == want.tokens == 4 * 511
    assert got.perplexity == pytest.approx(want.perplexity, rel=1e-3)


def test_full_rank_folder_layout_and_report(converted):
    folder = converted("full")
    config = json.loads((folder / "config.json").read_text())
    report = json.loads((folder / "tucker_report.json").read_text())
    t = config["tucker"]
    assert config["architectures"] == [ARCHITECTURE] and config["model_type"] == "llama"
    assert (t["r3"], t["rt3"], t["source_kv_width"]) == (192, 192, SOURCE_KV_WIDTH)
    assert len(t["latent_rope_freqs"]) == 30 and all(len(f) == 96 for f in t["latent_rope_freqs"])
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert report["compression_ratio"] == 1.0
    assert report["bytes_per_token"] == {"source": 30 * 384 * 4, "converted": 30 * 384 * 4}
    assert all(row["key_energy"] == pytest.approx(1) and row["value_energy"] == pytest.approx(1)
               for row in report["layers"])


def test_two_x_conversion_halves_the_cache_and_stays_usable(converted, smollm2):
    folder = converted(2.0)
    report = json.loads((folder / "tucker_report.json").read_text())
    assert report["key_rank"] + report["value_rank"] == SOURCE_KV_WIDTH // 2
    assert report["compression_ratio"] == 2.0
    assert report["bytes_per_token"]["converted"] * 2 == report["bytes_per_token"]["source"]
    assert all(0.5 < row["key_energy"] < 1 and 0.5 < row["value_energy"] < 1 for row in report["layers"])
    lm, tokenizer, _ = load_lm(str(folder))
    windows = text_windows(tokenizer, load_text("wiki", "eval"), 2048, 512)
    source_lm, _, _ = load_lm("smollm2-135m")
    # A regression bound, far looser than the figures measured in docs/quality.md.
    assert perplexity(lm, windows, progress=False).perplexity < 2.5 * perplexity(source_lm, windows, progress=False).perplexity
