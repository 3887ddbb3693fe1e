"""Engine-client logic that needs no engine: cache widths of a folder, CPU binding."""

import json
import os

import pytest

from tiny_checkpoint import tiny_config
from tucker_server.engine import EngineSettings, configure_cpu, memory_layout


def write_config(folder, config):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_memory_layout_of_a_tucker_folder(tmp_path):
    layout = memory_layout(write_config(tmp_path / "t", tiny_config()), "float32")
    assert (layout.width, layout.source_width, layout.num_layers) == (32, 128, 2)  # r3 + rt3 = 12 + 20
    assert layout.bytes_per_token == 2 * 32 * 4 and layout.compression_ratio == 4.0


def test_memory_layout_of_a_shared_latent_folder(tmp_path):
    layout = memory_layout(write_config(tmp_path / "s", tiny_config(shared_latent=True)), "bfloat16")
    assert layout.width == 12 and layout.bytes_per_token_per_layer == 24


def test_memory_layout_of_a_source_model_is_its_gqa_cache(tmp_path):
    config = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3}
    layout = memory_layout(write_config(tmp_path / "src", config), "float32")
    assert (layout.width, layout.source_width, layout.compression_ratio) == (384, 384, 1.0)


@pytest.mark.parametrize("cores,ranks,expected", [(2, 1, "0-1"), (2, 2, "0-0|1-1"), (4, 2, "0-1|2-3"), (16, 1, None)])
def test_cpu_binding_shares_small_machines_between_ranks(monkeypatch, tmp_path, cores, ranks, expected):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    configure_cpu(EngineSettings(tmp_path, "m", tensor_parallel_size=ranks))
    assert os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == expected
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ  # our kv_cache_memory_bytes must win
