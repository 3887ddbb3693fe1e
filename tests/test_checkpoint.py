"""The checkpoint format: its name, the config block written and parsed back, the folder, and a
vLLM plugin that loads it without the model-source machinery (GGUF reading, pip installs)."""

import json
import subprocess
import sys

import pytest
import torch

from tucker_serve.checkpoint import (
    ARCHITECTURE, TOKENIZER_FILES, ModelError, TuckerModelConfig, converted_config, read_config, write_folder,
)

SOURCE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
          "rms_norm_eps": 1e-6, "torch_dtype": "float32", "quantization_config": {"quant_method": "gguf"}}


def written(**change) -> dict:
    args = dict(heads=4, head_dim=16, r3=12, rt3=20, qkv_bias=False, source_kv_width=64,
                latent_rope_freqs=[[1.0] * 6, [0.5] * 6], dtype="bfloat16")
    return converted_config(SOURCE, **{**args, **change})


def test_the_architecture_name_is_the_one_vllm_registers():
    assert ARCHITECTURE == "TuckerLlamaForCausalLM"  # a rename breaks every folder already written


def test_written_config_parses_back_to_its_ranks():
    config = written()
    assert config["architectures"] == [ARCHITECTURE] and config["dtype"] == "bfloat16"
    assert "quantization_config" not in config and "torch_dtype" not in config
    cfg = TuckerModelConfig.from_dict(json.loads(json.dumps(config)))
    assert len(cfg.layers) == 2 and cfg.layers[0] == cfg.layers[1]
    a = cfg.layers[0]
    assert (a.r1, a.r2, a.r3, a.rt1, a.rt2, a.rt3) == (4, 64, 12, 4, 64, 20)
    assert cfg.block_core and not a.shared_latent and not cfg.qkv_bias
    assert cfg.softmax_scale == 0.25 and cfg.source_kv_width == 64 and cfg.num_layers == 2


def test_latent_widths_may_differ_by_layer_and_equal_ones_are_written_as_one_number():
    config = written(r3=[12, 8], rt3=[20, 20], latent_rope_freqs=[[1.0] * 6, [0.5] * 4])
    assert config["tucker"]["r3"] == [12, 8] and config["tucker"]["rt3"] == 20
    cfg = TuckerModelConfig.from_dict(json.loads(json.dumps(config)))
    assert [(a.r3, a.rt3) for a in cfg.layers] == [(12, 20), (8, 20)]
    assert written(r3=[12, 12])["tucker"]["r3"] == 12  # uniform checkpoints keep their old form
    config["tucker"]["r3"] = [12, 8, 4]
    with pytest.raises(ModelError, match="'tucker.r3' lists 3 ranks for 2 layers"):
        TuckerModelConfig.from_dict(config)


@pytest.mark.parametrize("change,needle", [
    (lambda c: c.update(architectures=["LlamaForCausalLM"]), f"architectures must include {ARCHITECTURE}"),
    (lambda c: c.pop("tucker"), "missing field 'tucker'"),
    (lambda c: c["tucker"].pop("source_kv_width"), "missing field 'tucker.source_kv_width'"),
    (lambda c: c["tucker"]["latent_rope_freqs"].pop(), "must hold 2 lists of r3/2 frequencies"),
])
def test_a_broken_config_is_refused_naming_the_field(change, needle):
    config = written()
    change(config)
    with pytest.raises(ModelError, match=needle):
        TuckerModelConfig.from_dict(config)


def test_folder_holds_config_weights_tokenizer_and_report(tmp_path):
    from safetensors.torch import load_file

    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.json").write_text("{}")
    (source / "unrelated.txt").write_text("not copied")
    write_folder(tmp_path / "out", written(), {"w": torch.ones(2, 3)}, {"source": "x"}, tokenizer_from=source)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"config.json", "model.safetensors", "tokenizer.json", "tucker_report.json"}
    assert "tokenizer.json" in TOKENIZER_FILES
    assert read_config(tmp_path / "out") == json.loads(json.dumps(written()))
    assert load_file(tmp_path / "out" / "model.safetensors")["w"].sum().item() == 6


def test_a_folder_without_config_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        read_config(tmp_path)


@pytest.mark.slow
def test_the_vllm_plugin_does_not_load_the_model_sources():
    pytest.importorskip("vllm")
    code = ("import sys, tucker_vllm, tucker_vllm.model; "
            "print(sorted(m for m in sys.modules if m.startswith('tucker_serve.sources')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
