"""Bad input to the commands: one clear error line, a non-zero exit, no half-written output."""

import json
import subprocess
import sys

import pytest


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tucker_cli", *args], capture_output=True, text=True,
                          timeout=600)


def one_error_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("tucker-serve")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0]
    assert "Traceback" not in proc.stderr


def llama_config(**changes) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 256, "rms_norm_eps": 1e-6, "max_position_embeddings": 256, **changes}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device,needle", [("cuda", "no CUDA device is visible"), ("tpu", "is not a device")])
def test_convert_on_a_device_this_machine_lacks_fails_before_any_work(tmp_path, device, needle):
    proc = run_cli("convert", "--kv-ratio", "2", "--device", device, "--out", str(tmp_path / "o"))
    one_error_line(proc, f"--device {device}" if device != "tpu" else "'tpu'", needle)
    assert not (tmp_path / "o").exists()


def test_missing_model_file(tmp_path):
    proc = run_cli("convert", "--model", str(tmp_path / "nope.gguf"), "--kv-ratio", "2", "--out", str(tmp_path / "o"))
    one_error_line(proc, "not found", "built-in name")
    assert not (tmp_path / "o").exists()


def test_non_llama_config_names_what_is_supported(tmp_path):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    proc = run_cli("convert", "--model", str(model), "--kv-ratio", "2", "--out", str(tmp_path / "o"))
    one_error_line(proc, "model_type 'gpt2' is not supported", "Llama/SmolLM", "Qwen2")
    assert not (tmp_path / "o").exists()


def test_corrupt_safetensors_leaves_no_output(tmp_path):
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(llama_config()))
    (model / "model.safetensors").write_bytes(b"\x00\x01 this is not a safetensors file")
    out = tmp_path / "o"
    proc = run_cli("convert", "--model", str(model), "--kv-ratio", "2", "--out", str(out))
    one_error_line(proc, "cannot load model")
    assert not out.exists() and list(tmp_path.iterdir()) == [model]


def test_corrupt_gguf(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    proc = run_cli("convert", "--model", str(gguf), "--kv-ratio", "2", "--out", str(tmp_path / "o"))
    one_error_line(proc, "cannot read GGUF file")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["--key-rank", "500", "--value-rank", "64"], "key_rank=500 must lie in [1, 192], G*D of this model (--key-rank)"),
    (["--key-rank", "63", "--value-rank", "64"], "key_rank=63 must be even"),
    (["--kv-ratio", "200"], "kv_ratio=200.0 must lie in [1, 96] for this model (--kv-ratio)"),
])
def test_ranks_that_do_not_fit(tmp_path, smollm2, args, needle):
    proc = run_cli("convert", "--model", "smollm2-135m", *args, "--out", str(tmp_path / "o"))
    one_error_line(proc, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_eval_json_last_line_is_one_object(tmp_path, smollm2):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    proc = run_cli("eval", "--model", "smollm2-135m", "--text", str(text), "--tokens", "128", "--window", "32",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 4 * 31 and result["windows"] == 4
    assert 1 < result["perplexity"] < 100 and result["tucker"] is False


def test_chat_and_long_evaluations_run_one_at_a_time():
    one_error_line(run_cli("eval", "--chat", "--long"), "--chat and --long")


def test_a_base_model_without_a_chat_template_is_refused_by_eval_long(tmp_path, smollm2):
    base = tmp_path / "base"
    base.mkdir()
    for f in smollm2.folder.iterdir():  # the source without its chat template, as a base model comes
        if f.name != "chat_template.jinja":
            (base / f.name).symlink_to(f)
    assert "chat_template" not in json.loads((base / "tokenizer_config.json").read_text())
    one_error_line(run_cli("eval", "--long", "--model", str(base)), "needs a chat template")
