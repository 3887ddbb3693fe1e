"""Reference TuckerLlama in plain PyTorch: loads a folder written by `tucker-serve convert`.

Llama blocks (RMSNorm, SwiGLU MLP, tied or separate LM head) around TuckerAttention. Used by
evaluation, healing, and as the oracle of the vLLM parity tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tucker_serve.attention import TuckerAttention
from tucker_serve.checkpoint import ModelError, TuckerModelConfig
from tucker_serve.families import HIDDEN_ACT


class MLP(nn.Module):
    """The gated MLP of every supported family (activation: families.HIDDEN_ACT)."""

    def __init__(self, hidden: int, inner: int, dtype) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, inner, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(inner, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(getattr(F, HIDDEN_ACT)(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TuckerModelConfig, layer: int, dtype, cache_dtype=None) -> None:
        super().__init__()
        freqs = torch.tensor(cfg.latent_rope_freqs[layer], dtype=torch.float64)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = TuckerAttention(
            cfg.layers[layer], freqs, cfg.softmax_scale, cfg.block_core, bias=cfg.qkv_bias, dtype=dtype,
            cache_dtype=cache_dtype,
        )
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class TuckerLlama(nn.Module):
    """Causal LM over Tucker attention; state-dict names follow the Hugging Face Llama layout.
    `cache_dtype` (e.g. torch.float8_e4m3fn) rounds the latent keys and values as a serving cache
    of that type stores them (scale 1)."""

    def __init__(self, cfg: TuckerModelConfig, dtype=torch.float32, cache_dtype=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.model.layers = nn.ModuleList(Block(cfg, i, dtype, cache_dtype) for i in range(cfg.num_layers))
        self.model.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        x = self.model.embed_tokens(input_ids)
        for block in self.model.layers:
            x = block(x, positions)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab)."""
        return self.lm_head(self.hidden_states(input_ids, positions))

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32, cache_dtype=None) -> "TuckerLlama":
        """Load a Tucker folder, checking every tensor's name and shape against config.json."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = TuckerModelConfig.from_dict(json.loads((folder / "config.json").read_text()), folder / "config.json")
        model = cls(cfg, dtype, cache_dtype)
        try:
            state = load_file(folder / "model.safetensors")
        except (OSError, SafetensorError) as exc:
            raise ModelError(f"cannot read {folder / 'model.safetensors'}: {exc}") from None
        load_checked(model, state, folder)
        return model.eval()


def expected_shapes(cfg: TuckerModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint with this config must hold, with its shape (tied head omitted)."""
    with torch.device("meta"):
        model = TuckerLlama(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def checked_tensors(cfg: TuckerModelConfig, tensors, where):
    """Yield (name, tensor) pairs, failing with one clear line on the first unexpected name or shape
    and, at the end, on the first missing tensor. A tied LM head's copy is skipped."""
    want, seen = expected_shapes(cfg), set()
    for name, tensor in tensors:
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name not in want:
            raise ModelError(f"{where}: unexpected tensor {name} in the checkpoint")
        if tuple(tensor.shape) != want[name]:
            raise ModelError(
                f"{where}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the ranks in config.json need {want[name]}"
            )
        seen.add(name)
        yield name, tensor
    missing = sorted(set(want) - seen)
    if missing:
        raise ModelError(f"{where}: checkpoint lacks tensor {missing[0]} ({len(missing)} missing)")


def load_checked(model: TuckerLlama, state: dict[str, torch.Tensor], where) -> None:
    """Copy a checked `state` into `model`."""
    model.load_state_dict(dict(checked_tensors(model.cfg, state.items(), where)), strict=False)
