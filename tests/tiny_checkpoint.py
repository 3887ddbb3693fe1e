"""A tiny random Tucker checkpoint: dense (non-block) cores by default, r3 != rt3, biases, untied head.

It exercises the general Tucker path that converted Llama checkpoints (block cores) do not.
Its vocabulary is 256 token ids and it has no tokenizer (engines run with skip_tokenizer_init).
"""

import json
from pathlib import Path

import torch

from tucker_serve.checkpoint import ARCHITECTURE, TuckerModelConfig
from tucker_serve.model import TuckerLlama
from tucker_serve.rope import default_inv_freq

LAYERS, HIDDEN, HEADS, VOCAB = 2, 64, 4, 256
RANKS = dict(r1=4, r2=32, r3=12, rt1=3, rt2=48, rt3=20)


def tiny_config(shared_latent: bool = False, block_core: bool = False, ranks: dict | None = None) -> dict:
    ranks = ranks or (dict(RANKS, rt3=RANKS["r3"]) if shared_latent else RANKS)
    freqs = [(default_inv_freq(ranks["r3"], 500.0) * (1 + 0.1 * i)).tolist() for i in range(LAYERS)]
    return {
        "architectures": [ARCHITECTURE], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": 128, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 1024, "tie_word_embeddings": False,
        "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1, "dtype": "float32",
        "tucker": {**ranks, "block_core": block_core, "shared_latent": shared_latent, "qkv_bias": True,
                   "softmax_scale": 0.35, "source_kv_width": 2 * HIDDEN, "latent_rope_freqs": freqs},
    }


def write_tiny_checkpoint(folder: Path, seed: int = 0, shared_latent: bool = False, block_core: bool = False,
                          ranks: dict | None = None) -> Path:
    """Random weights scaled so that logits vary by a few nats; returns the folder."""
    from safetensors.torch import save_file

    config = tiny_config(shared_latent, block_core, ranks)
    torch.manual_seed(seed)
    model = TuckerLlama(TuckerModelConfig.from_dict(config))
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = 1 + 0.1 * torch.randn_like(p)
        else:
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            state[name] = torch.randn_like(p) * (0.3 if p.dim() == 1 else 1.5 / fan_in**0.5)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
