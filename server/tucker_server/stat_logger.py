"""The tucker_kv_* gauges, fed by vLLM's stat-logger interface (entry point `vllm.stat_logger_plugins`).

vLLM builds one logger per engine in its API-server process and serves the gauges on its own
/metrics next to the vllm:* metrics (requests, tokens, latency, usage), which we do not repeat.
"""

from __future__ import annotations

from prometheus_client import Gauge
from vllm.v1.metrics.loggers import StatLoggerBase

from tucker_server.kv_memory import USAGE, EngineMemory
from tucker_serve import cache_layout as cl

LABELS = ["model_name", "engine"]


def gauge(name: str, doc: str) -> Gauge:
    # "mostrecent" keeps the gauge meaningful when vLLM runs several API-server processes.
    return Gauge(name, doc, LABELS, multiprocess_mode="mostrecent")


ELEMENT_BYTES = gauge("tucker_kv_element_bytes", "bytes of one cached number (the KV-cache dtype: 4, 2 or 1 for fp8)")
BYTES_PER_TOKEN = gauge("tucker_kv_bytes_per_token", "KV-cache bytes one token occupies (all layers)")
BYTES_PER_TOKEN_PER_LAYER = gauge("tucker_kv_bytes_per_token_per_layer", "KV-cache bytes per token per layer")
SOURCE_BYTES_PER_TOKEN = gauge("tucker_kv_source_bytes_per_token",
                               "bytes per token the source model's cache would take (same cache dtype)")
COMPRESSION_RATIO = gauge("tucker_kv_compression_ratio", "source KV bytes per token / this model's")
CAPACITY_TOKENS = gauge("tucker_kv_capacity_tokens", "tokens the allocated KV cache holds")
BLOCKS_TOTAL = gauge("tucker_kv_blocks_total", "KV-cache blocks vLLM allocated")
BLOCKS_USED = gauge("tucker_kv_blocks_used", "KV-cache blocks in use")


class TuckerStatLogger(StatLoggerBase):
    """Sets the static KV-memory gauges once, then the blocks in use at every scheduler step."""

    def __init__(self, vllm_config, engine_index: int = 0) -> None:
        self.memory, self.engine = EngineMemory.of(vllm_config), engine_index
        labels = {"model_name": self.memory.model, "engine": str(engine_index)}
        lay = self.memory.layout
        for g, value in ((ELEMENT_BYTES, cl.dtype_bytes(lay.dtype)), (BYTES_PER_TOKEN, lay.bytes_per_token),
                         (BYTES_PER_TOKEN_PER_LAYER, lay.bytes_per_token_per_layer),
                         (SOURCE_BYTES_PER_TOKEN, lay.source_bytes_per_token),
                         (COMPRESSION_RATIO, lay.compression_ratio),
                         (CAPACITY_TOKENS, self.memory.capacity_tokens), (BLOCKS_TOTAL, self.memory.num_blocks)):
            g.labels(**labels).set(value)
        self.blocks_used = BLOCKS_USED.labels(**labels)
        self.blocks_used.set(0)
        USAGE[engine_index] = 0.0

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            USAGE[self.engine] = scheduler_stats.kv_cache_usage
            self.blocks_used.set(self.memory.blocks_used(scheduler_stats.kv_cache_usage))

    def log_engine_initialized(self) -> None:
        pass
