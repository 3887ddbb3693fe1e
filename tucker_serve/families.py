"""Source model families: one record per model_type the conversion supports, and what it refuses.

Sources check a config here before anything loads; calibration and conversion read a family's
projections and biases; the reference model and the plugin build the MLP with HIDDEN_ACT.
Adding a family is one record in FAMILIES plus its case in tests/test_families.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from tucker_serve.checkpoint import ModelError

HIDDEN_ACT = "silu"  # SwiGLU MLPs: the reference model and the plugin build no other
# Rope types that only rescale the frequencies: the latent RoPE carries any frequency vector.
RESCALING_ROPE_TYPES = ("default", "linear", "llama3")
# A normalized key is not a linear function of the hidden state: no latent basis can carry it.
QK_NORM_TYPES = ("qwen3", "qwen3_moe", "gemma3", "gemma3_text", "olmo2", "chameleon")


@dataclass(frozen=True)
class Family:
    """A Llama-shaped model_type: the name users know, its attention's projections and biases."""

    model_type: str
    label: str
    qkv_bias: bool = False  # whether q/k/v carry biases when config.json has no `attention_bias`
    projections: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj")  # query, key, value, output

    def has_qkv_bias(self, config: dict) -> bool:
        return config.get("attention_bias", self.qkv_bias)

    def attention_projections(self, attn) -> tuple:
        """The (query, key, value, output) linear layers of one transformers attention module."""
        return tuple(getattr(attn, name) for name in self.projections)


FAMILIES = {f.model_type: f for f in (
    Family("llama", "Llama/SmolLM"),
    Family("mistral", "Mistral"),
    Family("qwen2", "Qwen2", qkv_bias=True),
)}


def rope_parameters(config: dict) -> dict:
    """The RoPE settings of a source config.json (rope_parameters or rope_scaling), with rope_theta."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return {"rope_theta": config.get("rope_theta", 10000.0), **rope}


def supported_family(config: dict, where) -> Family:
    """The family of a source config.json; a ModelError naming first the feature, then the family,
    for what the conversion cannot express."""
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if window and window < config.get("max_position_embeddings", 0):
        raise ModelError(f"{where}: sliding-window attention (window {window}) is not supported")
    if config.get("rope_local_base_freq"):
        raise ModelError(f"{where}: two RoPE bases (rope_theta for global layers, rope_local_base_freq for local "
                         "ones) are not supported")
    if config.get("model_type") in QK_NORM_TYPES:
        raise ModelError(f"{where}: QK-norm (q_norm and k_norm before RoPE) is not supported: a normalized key is "
                         "not a linear function of the hidden state, so no latent basis can carry it")
    rope = rope_parameters(config)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in RESCALING_ROPE_TYPES:
        raise ModelError(f"{where}: rope_type {kind!r} is not supported; supported are "
                         f"{', '.join(RESCALING_ROPE_TYPES)} (types that only rescale frequencies)")
    kind = config.get("model_type")
    if kind not in FAMILIES:
        names = ", ".join(f"{f.label} (model_type {k})" for k, f in FAMILIES.items())
        raise ModelError(f"{where}: model_type {kind!r} is not supported; supported are {names}")
    if config.get("hidden_act", HIDDEN_ACT) != HIDDEN_ACT:
        raise ModelError(f"{where}: hidden_act {config['hidden_act']!r} is not supported ({HIDDEN_ACT} only)")
    return FAMILIES[kind]
