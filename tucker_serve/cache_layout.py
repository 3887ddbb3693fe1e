"""The one place that counts attention parameters and KV-cache bytes (torch-free).

Cache widths are numbers stored per token per layer; bytes multiply by the element size. The
plugin, the metrics, the benchmark and the docs all import these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tucker_serve.cache_dtypes import lookup
from tucker_serve.checkpoint import TuckerModelConfig


def dtype_bytes(dtype) -> int:
    """Element size of a dtype given as a string ('bfloat16') or a torch dtype."""
    return lookup(dtype).bytes


def mha_kv_width(num_heads: int, head_dim: int) -> int:
    """MHA caches a key and a value per head."""
    return 2 * num_heads * head_dim


def gqa_kv_width(num_kv_heads: int, head_dim: int) -> int:
    """GQA caches a key and a value per KV head (MQA: num_kv_heads = 1)."""
    return 2 * num_kv_heads * head_dim


def mla_kv_width(kv_lora_rank: int, rope_dim: int = 0) -> int:
    """MLA caches its compressed latent plus the decoupled RoPE key (0 when RoPE is on the latent)."""
    return kv_lora_rank + rope_dim


def tucker_kv_width(r3: int, rt3: int, shared_latent: bool = False) -> int:
    """Tucker caches one latent key (r3) and value (rt3) per token; shared-latent only the key."""
    return r3 if shared_latent else r3 + rt3


def kv_bytes_per_token(width: int, num_layers: int, dtype) -> int:
    """Bytes one token occupies in the cache of the whole model."""
    return width * num_layers * dtype_bytes(dtype)


def kv_cache_bytes(width: int, num_layers: int, num_tokens: int, dtype) -> int:
    """Bytes of a cache holding `num_tokens` tokens."""
    return kv_bytes_per_token(width, num_layers, dtype) * num_tokens


def capacity_tokens(budget_bytes: int, width: int, num_layers: int, dtype, block_size: int = 1) -> int:
    """Tokens a cache budget holds, in whole blocks of `block_size` tokens."""
    per_block = kv_bytes_per_token(width, num_layers, dtype) * block_size
    return budget_bytes // per_block * block_size


def max_concurrency(capacity: int, context_len: int, block_size: int = 1) -> float:
    """Sequences of `context_len` tokens that fit at once (each rounded up to whole blocks)."""
    return capacity / (math.ceil(context_len / block_size) * block_size)


def compression_ratio(source_width: int, tucker_width: int) -> float:
    """Source cache bytes per token over the converted model's."""
    return source_width / tucker_width


def gqa_params(hidden: int, num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """Attention weights of MHA/GQA/MQA (no biases): Wq, Wo (d x H D) and Wk, Wv (d x G D)."""
    return 2 * hidden * num_heads * head_dim + 2 * hidden * num_kv_heads * head_dim


def mla_params(hidden: int, num_heads: int, head_dim: int, kv_lora_rank: int, q_lora_rank: int) -> int:
    """MLA with RoPE on the latent: W_DQ, W_UQ, W_DKV, W_UK, W_UV, W_O (no norms, no biases)."""
    return (
        hidden * q_lora_rank + q_lora_rank * num_heads * head_dim
        + hidden * kv_lora_rank + 2 * kv_lora_rank * num_heads * head_dim
        + num_heads * head_dim * hidden
    )


def tucker_params(hidden: int, num_heads: int, ranks, post_ranks=None, shared_latent: bool = False) -> int:
    """Tucker attention: core + factors of both tensors, 2(r1 r2 r3 + H r1 + d r2 + d r3) when equal.

    A shared latent reuses U3 as Ut3, so Ut3 is not counted.
    """
    r1, r2, r3 = ranks
    t1, t2, t3 = ranks if post_ranks is None else post_ranks
    pre = r1 * r2 * r3 + num_heads * r1 + hidden * r2 + hidden * r3
    post = t1 * t2 * t3 + num_heads * t1 + hidden * t2 + (0 if shared_latent else hidden * t3)
    return pre + post


def folded_attention_params(hidden: int, num_heads: int, r3: int, rt3: int, shared_latent: bool = False) -> int:
    """Attention weights as the plugin serves them (tucker_serve/fold.py, no biases): one QKV projection
    d -> H r3 + r3 + rt3 (each head's query in the latent, the latent key and value) and the output
    projection H rt3 -> d. Each head's query and output are r3 (rt3) wide where the source's are
    head_dim: at 2x on Llama-3-8B (r3 = 512, head_dim 128) that is 4x the source's Wq and Wo."""
    return hidden * (num_heads * r3 + r3 + (0 if shared_latent else rt3) + num_heads * rt3)


def decode_bytes_per_step(weight_bytes: float, kv_bytes_per_token: float, context: int, batch: int) -> float:
    """Bytes one decode step reads when memory bandwidth bounds it: every weight once (shared by the
    batch) and each sequence's whole cache (`context` tokens)."""
    return weight_bytes + batch * context * kv_bytes_per_token


def param_bytes(params_per_layer: int, num_layers: int, dtype) -> int:
    """Bytes of attention weights over the model."""
    return params_per_layer * num_layers * dtype_bytes(dtype)


@dataclass(frozen=True)
class MemoryLayout:
    """What one token costs in a model's KV cache, and in its source model's, in one cache dtype.
    A Tucker model may cache a different latent width in each layer (`widths`)."""

    widths: tuple[int, ...]  # numbers cached per token, layer by layer
    source_width: int  # per layer
    dtype: str  # the cache's element type

    @property
    def num_layers(self) -> int:
        return len(self.widths)

    @property
    def width(self) -> float:
        """Numbers cached per token per layer, averaged over layers (an int when all are equal)."""
        total = sum(self.widths)
        return total // self.num_layers if total % self.num_layers == 0 else total / self.num_layers

    @property
    def bytes_per_token_per_layer(self) -> float:
        return self.width * dtype_bytes(self.dtype)

    @property
    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(sum(self.widths), 1, self.dtype)

    @property
    def source_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.source_width, self.num_layers, self.dtype)

    @property
    def compression_ratio(self) -> float:
        return compression_ratio(self.source_width * self.num_layers, sum(self.widths))


def model_layout(config: dict, dtype) -> MemoryLayout:
    """The cache layout a config.json describes: the Tucker latent, an MLA latent, or K and V per KV head."""
    layers = config["num_hidden_layers"]
    if config.get("tucker"):
        t = TuckerModelConfig.from_dict(config)
        widths = tuple(tucker_kv_width(a.r3, a.rt3, a.shared_latent) for a in t.layers)
        return MemoryLayout(widths, t.source_kv_width, str(dtype))
    if config.get("kv_lora_rank"):
        width = mla_kv_width(config["kv_lora_rank"], config.get("qk_rope_head_dim", 0))
    else:
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        width = gqa_kv_width(config.get("num_key_value_heads") or heads, head_dim)
    return MemoryLayout((width,) * layers, width, str(dtype))
