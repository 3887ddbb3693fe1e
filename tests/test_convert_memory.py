"""bench/convert_memory.py's model of conversion memory counts the parameters transformers builds
for each shape, and its parts add up (the measurement itself is the benchmark's, not a test's)."""

import importlib.util
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location("convert_memory", Path(__file__).parents[1] / "bench" / "convert_memory.py")
convert_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert_memory)


@pytest.mark.parametrize("name", list(convert_memory.SHAPES))
def test_the_memory_model_counts_the_parameters_of_each_shape(name):
    import transformers as tf

    shape = convert_memory.SHAPES[name]
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**shape))
    model_of = convert_memory.memory_model(shape, tokens=16384, window=4096, baseline=0)
    assert model_of["parameters"] == sum(p.numel() for p in model.parameters())
    assert model_of["parts_gb"]["checkpoint (bfloat16)"] == pytest.approx(2 * model_of["parameters"] / 1e9, abs=1e-3)
    assert model_of["peak_gb"] == pytest.approx(sum(model_of["parts_gb"].values()), abs=0.02)


def test_the_committed_measurement_is_of_this_checkpoint_at_2x():
    import json

    result = json.loads((Path(__file__).parents[1] / "docs" / "bench" / "convert_memory.json").read_text())
    assert result["checkpoint"]["shape"] == convert_memory.ONE_B
    assert result["measured"]["compression_ratio"] == 2.0 and result["measured"]["written_dtype"] == "bfloat16"
    assert result["measured"]["peak_over_checkpoint"] == pytest.approx(
        result["measured"]["peak_rss_bytes"] / result["checkpoint"]["safetensors_bytes"], abs=1e-3)
    glibc = result["measured"]["glibc_default_threshold"]  # the same conversion with glibc's own threshold
    assert glibc["peak_over_checkpoint"] == pytest.approx(
        glibc["peak_rss_bytes"] / result["checkpoint"]["safetensors_bytes"], abs=1e-3)
