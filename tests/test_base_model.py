"""A base model (a tokenizer without a chat template) converts and heals: calibration and healing fall
back to text with a one-line notice, and `eval --chat` refuses it by name (test_cli_errors)."""

import json
import shutil

import pytest

from tucker_serve.checkpoint import TOKENIZER_FILES


@pytest.fixture(scope="module")
def base_model(smollm2, tmp_path_factory):
    """A small random Llama with SmolLM2's tokenizer, its chat template removed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("base") / "tiny-base"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (smollm2.folder / name).is_file() and name != "chat_template.jinja":
            shutil.copy2(smollm2.folder / name, folder / name)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def test_a_base_model_converts_and_heals_on_text_with_a_notice(base_model, tmp_path, capsys):
    from tucker_serve.convert import ConvertOptions, convert
    from tucker_serve.heal import HealOptions, heal

    report = convert(str(base_model), tmp_path / "tucker", ConvertOptions(kv_ratio=2.0, calib_tokens=2048),
                     progress=False)
    err = capsys.readouterr().err
    assert err.count("has no chat template (a base model?): calibrating on text only") == 1
    assert report["calibration"]["text"] == "wiki" and report["calibration"]["tokens"] == 2048
    healed = heal(tmp_path / "tucker", tmp_path / "healed", HealOptions(steps=1, text="wiki", eval_tokens=0),
                  progress=False)
    assert "has no chat template (a base model?): healing on text only" in capsys.readouterr().err
    assert (tmp_path / "healed" / "model.safetensors").is_file() and healed["healing"]["global_steps"] == 1
    assert healed["healing"]["kl_steps_per_minute"] > 0
