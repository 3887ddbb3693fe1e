"""KV-memory figures of a running engine: the layout from vLLM's config, the live usage from the
stat logger. Every byte figure comes from `tucker_serve.cache_layout`."""

from __future__ import annotations

from dataclasses import dataclass

from tucker_serve import cache_dtypes
from tucker_serve import cache_layout as cl
from tucker_serve.cache_layout import MemoryLayout, model_layout

# Latest KV usage fraction per engine index, written by the stat logger, read by /v1/memory.
# Both live in vLLM's API-server process.
USAGE: dict[int, float] = {}


def cache_dtype(vllm_config) -> str:
    """The cache's element type as vLLM allocates it: 'auto' follows the model's dtype."""
    return cache_dtypes.resolve(vllm_config.cache_config.cache_dtype, vllm_config.model_config.dtype)


@dataclass(frozen=True)
class EngineMemory:
    """What vLLM allocated for one engine, in the terms of the model's cache layout."""

    model: str
    layout: MemoryLayout
    block_size: int
    num_blocks: int
    weights_dtype: str
    max_model_len: int
    sized_by: str  # what set the cache's size: "kv_cache_memory_bytes" or "gpu_memory_utilization=F"

    @classmethod
    def of(cls, vllm_config) -> "EngineMemory":
        model = vllm_config.model_config
        cache = vllm_config.cache_config
        sized_by = ("kv_cache_memory_bytes" if cache.kv_cache_memory_bytes
                    else f"gpu_memory_utilization={cache.gpu_memory_utilization}")
        return cls(model.served_model_name, model_layout(model.hf_config.to_dict(), cache_dtype(vllm_config)),
                   cache.block_size, cache.num_gpu_blocks or 0, str(model.dtype).removeprefix("torch."),
                   model.max_model_len, sized_by)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_used(self, usage: float) -> int:
        # vLLM keeps one null block out of use: its usage fraction counts the others.
        return round(usage * max(self.num_blocks - 1, 0))

    def document(self, usage: float) -> dict:
        """The /v1/memory document at KV usage fraction `usage`."""
        lay = self.layout
        return {
            "model": self.model,
            "cache_dtype": lay.dtype,
            "bytes_per_element": cl.dtype_bytes(lay.dtype),
            "num_layers": lay.num_layers,
            "kv_width_per_token_per_layer": lay.width,  # the mean over layers
            "kv_widths_per_layer": list(lay.widths),
            "bytes_per_token_per_layer": lay.bytes_per_token_per_layer,
            "bytes_per_token": lay.bytes_per_token,
            "source_bytes_per_token": lay.source_bytes_per_token,
            "compression_ratio": lay.compression_ratio,
            "block_size": self.block_size,
            "blocks_total": self.num_blocks,
            "blocks_used": self.blocks_used(usage),
            "capacity_tokens": self.capacity_tokens,
            "cache_bytes": self.capacity_tokens * lay.bytes_per_token,
            "cache_sized_by": self.sized_by,
            "weights_dtype": self.weights_dtype,
            "max_model_len": self.max_model_len,
            "usage": usage,
        }
