"""The Tucker checkpoint format: architecture name, the `tucker` block of config.json, the folder.

A Tucker folder is a Hugging Face folder: config.json (the source's fields, architectures
[ARCHITECTURE] and a `tucker` block with the ranks and latent RoPE), model.safetensors, the
source's tokenizer files and tucker_report.json. `converted_config` writes the block and
`TuckerModelConfig.from_dict` is its one parser (reference model, plugin, cache layout).
Torch is imported only when tensors are written, so that the plugin and the CLI load this cheaply.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tucker_serve.config import TuckerConfig
from tucker_serve.paths import atomic_dir

ARCHITECTURE = "TuckerLlamaForCausalLM"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt",
)
TUCKER_FIELDS = ("r1", "r2", "r3", "rt1", "rt2", "rt3", "softmax_scale", "latent_rope_freqs", "source_kv_width")


class ModelError(ValueError):
    """A model argument that cannot be used; the message is meant for the user as is."""


def read_config(folder: Path) -> dict:
    """config.json of a model folder, as a dict."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{folder} has no config.json: not a Hugging Face model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from None


def is_tucker(config: dict) -> bool:
    return ARCHITECTURE in config.get("architectures", [])


@dataclass(frozen=True)
class TuckerModelConfig:
    """What the `tucker` block and the Llama fields of a Tucker folder's config.json say."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    layers: tuple[TuckerConfig, ...]  # attention shape of each layer (latent widths may differ)
    block_core: bool
    qkv_bias: bool
    softmax_scale: float
    latent_rope_freqs: tuple[tuple[float, ...], ...]  # per layer, r3/2 each
    source_kv_width: int

    @classmethod
    def from_dict(cls, cfg: dict, where="config.json") -> "TuckerModelConfig":
        if not is_tucker(cfg):
            raise ModelError(f"{where}: architectures must include {ARCHITECTURE}")
        t = cfg.get("tucker")
        if not isinstance(t, dict):
            raise ModelError(f"{where}: missing field 'tucker' (ranks and latent RoPE of the conversion)")
        for key in TUCKER_FIELDS:
            if key not in t:
                raise ModelError(f"{where}: missing field 'tucker.{key}'")
        layers = cfg["num_hidden_layers"]
        r3, rt3 = (per_layer(t, name, layers, where) for name in ("r3", "rt3"))
        attention = tuple(
            TuckerConfig(hidden_size=cfg["hidden_size"], num_heads=cfg["num_attention_heads"],
                         r1=t["r1"], r2=t["r2"], r3=r3[i], rt1=t["rt1"], rt2=t["rt2"], rt3=rt3[i],
                         rope=True, shared_latent=t.get("shared_latent", False))
            for i in range(layers)
        )
        freqs = t["latent_rope_freqs"]
        if len(freqs) != layers or any(len(f) != a.r3 // 2 for f, a in zip(freqs, attention)):
            raise ModelError(
                f"{where}: field 'tucker.latent_rope_freqs' must hold {layers} lists of r3/2 frequencies "
                f"(r3 of each layer: {list(r3)})"
            )
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg["rms_norm_eps"], tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            layers=attention, block_core=t.get("block_core", False), qkv_bias=t.get("qkv_bias", False),
            softmax_scale=t["softmax_scale"], latent_rope_freqs=tuple(tuple(f) for f in freqs),
            source_kv_width=t["source_kv_width"],
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def per_layer(block: dict, name: str, layers: int, where) -> tuple[int, ...]:
    """A rank of the `tucker` block: one number for every layer, or a list with one per layer."""
    value = block[name]
    if isinstance(value, list):
        if len(value) != layers:
            raise ModelError(f"{where}: field 'tucker.{name}' lists {len(value)} ranks for {layers} layers")
        return tuple(value)
    return (value,) * layers


def one_or_list(ranks) -> int | list[int]:
    """Per-layer ranks as written: one number when every layer has it, else the list."""
    ranks = [ranks] if isinstance(ranks, int) else list(ranks)
    return ranks[0] if len(set(ranks)) == 1 else ranks


def converted_config(source: dict, *, heads: int, head_dim: int, r3, rt3, qkv_bias: bool,
                     source_kv_width: int, latent_rope_freqs: list, dtype: str) -> dict:
    """config.json of a conversion of `source` (block cores: per-head slices of the source's Wq, Wo).
    r3 and rt3 are one number or a list with one per layer; a rank equal in every layer is written as one number."""
    r3, rt3 = one_or_list(r3), one_or_list(rt3)
    out = {k: v for k, v in source.items() if k not in ("quantization_config", "auto_map", "torch_dtype")}
    out["architectures"] = [ARCHITECTURE]
    out["dtype"] = dtype
    out["tucker"] = {
        "r1": heads, "r2": heads * head_dim, "r3": r3,
        "rt1": heads, "rt2": heads * head_dim, "rt3": rt3,
        "block_core": True, "shared_latent": False,
        "qkv_bias": qkv_bias,
        "softmax_scale": head_dim**-0.5,
        "source_kv_width": source_kv_width,
        "latent_rope_freqs": latent_rope_freqs,
    }
    return out


def write_folder(dest, config: dict, state: dict, report: dict, tokenizer_from: Path) -> None:
    """config.json, model.safetensors, the tokenizer files of `tokenizer_from` and tucker_report.json,
    all or nothing."""
    from safetensors.torch import save_file

    with atomic_dir(Path(dest)) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copy2(tokenizer_from / name, tmp / name)
        (tmp / "tucker_report.json").write_text(json.dumps(report, indent=2))
