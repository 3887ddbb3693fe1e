"""The engine client: vLLM's AsyncLLM over a Tucker (or any vLLM) checkpoint. No engine of our own."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from tucker_server.metrics import MemoryLayout, Metrics, stat_logger_factory
from tucker_serve import cache_layout as cl


@dataclass(frozen=True)
class EngineSettings:
    model: Path  # a resolved model folder
    served_name: str
    max_model_len: int | None = None
    kv_cache_gb: float = 1.0
    dtype: str = "float32"
    max_num_seqs: int | None = None
    enforce_eager: bool = True
    seed: int = 0
    prefix_caching: bool = True
    tensor_parallel_size: int = 1


def memory_layout(folder: Path, dtype: str) -> MemoryLayout:
    """Cache width per token per layer of a checkpoint: the Tucker latent, or K and V of its KV heads."""
    cfg = json.loads((folder / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    t = cfg.get("tucker")
    if t:
        width = cl.tucker_kv_width(t["r3"], t["rt3"], t.get("shared_latent", False))
        return MemoryLayout(layers, width, t["source_kv_width"], dtype)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    width = cl.gqa_kv_width(cfg.get("num_key_value_heads", cfg["num_attention_heads"]), head_dim)
    return MemoryLayout(layers, width, width, dtype)


def configure_cpu(settings: EngineSettings) -> None:
    """vLLM CPU settings: the cache size comes from our engine arguments (the env var would override
    them in whole GiB only); on small machines the workers share out every core (vLLM's automatic
    binding keeps one core per worker for its scheduler and wants a NUMA node per worker)."""
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    cores, ranks = os.cpu_count() or 1, settings.tensor_parallel_size
    if cores <= 4 and cores >= ranks:
        per = cores // ranks
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                              "|".join(f"{r * per}-{(r + 1) * per - 1}" for r in range(ranks)))


class EngineClient:
    """Thin async facade over AsyncLLM: generate, abort, tokenizer and memory figures."""

    def __init__(self, settings: EngineSettings, metrics: Metrics) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        if current_platform.is_cpu():
            configure_cpu(settings)
        self.settings = settings
        self.layout = memory_layout(settings.model, settings.dtype)
        args = AsyncEngineArgs(
            model=str(settings.model), served_model_name=[settings.served_name], dtype=settings.dtype,
            max_model_len=settings.max_model_len, enforce_eager=settings.enforce_eager,
            kv_cache_memory_bytes=int(settings.kv_cache_gb * 2**30), seed=settings.seed,
            max_num_seqs=settings.max_num_seqs, max_logprobs=20, enable_prefix_caching=settings.prefix_caching,
            tensor_parallel_size=settings.tensor_parallel_size,
        )
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger_factory(metrics, self.layout)])
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.model_config.max_model_len
        cache = self.llm.vllm_config.cache_config
        self.num_blocks, self.block_size = cache.num_gpu_blocks, cache.block_size

    def generate(self, prompt_ids: list[int], params, request_id: str) -> AsyncIterator:
        from vllm.inputs import TokensPrompt

        return self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id)

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    async def healthy(self) -> bool:
        try:
            await self.llm.check_health()
        except Exception:
            return False
        return not self.llm.errored

    def memory(self, usage: float) -> dict:
        """The /v1/memory document; `usage` is the latest KV usage fraction vLLM reported."""
        lay = self.layout
        return {
            "model": self.settings.served_name,
            "dtype": lay.dtype,
            "num_layers": lay.num_layers,
            "kv_width_per_token_per_layer": lay.width,
            "bytes_per_token_per_layer": lay.bytes_per_token_per_layer,
            "bytes_per_token": lay.bytes_per_token,
            "source_bytes_per_token": lay.source_bytes_per_token,
            "compression_ratio": lay.compression_ratio,
            "block_size": self.block_size,
            "blocks_total": self.num_blocks,
            "blocks_used": round(usage * max(self.num_blocks - 1, 0)),
            "capacity_tokens": self.num_blocks * self.block_size,
            "usage": usage,
        }

    def shutdown(self) -> None:
        self.llm.shutdown()
