"""Prometheus metrics, fed by vLLM's stat-logger interface (never by parsing logs).

Static KV-memory figures come from the one formula module (`tucker_serve.cache_layout`) and the
block count vLLM allocated; live figures from each SchedulerStats/IterationStats vLLM records.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from vllm.v1.metrics.loggers import StatLoggerBase

from tucker_serve import cache_layout as cl

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class MemoryLayout:
    """What one token costs in this model's cache, and in its source model's."""

    num_layers: int
    width: int  # numbers cached per token per layer
    source_width: int
    dtype: str

    @property
    def bytes_per_token_per_layer(self) -> int:
        return self.width * cl.dtype_bytes(self.dtype)

    @property
    def bytes_per_token(self) -> int:
        return cl.kv_bytes_per_token(self.width, self.num_layers, self.dtype)

    @property
    def source_bytes_per_token(self) -> int:
        return cl.kv_bytes_per_token(self.source_width, self.num_layers, self.dtype)

    @property
    def compression_ratio(self) -> float:
        return cl.compression_ratio(self.source_width, self.width)


class Metrics:
    """Every tucker_* metric, in a registry of its own (vLLM keeps its vllm:* ones elsewhere)."""

    def __init__(self) -> None:
        self.last_usage = 0.0  # latest KV usage fraction, for /v1/memory
        r = self.registry = CollectorRegistry()
        g = lambda name, doc: Gauge(name, doc, registry=r)
        self.bytes_per_token = g("tucker_kv_bytes_per_token", "KV-cache bytes one token occupies (all layers)")
        self.bytes_per_token_per_layer = g("tucker_kv_bytes_per_token_per_layer", "KV-cache bytes per token per layer")
        self.source_bytes_per_token = g("tucker_kv_source_bytes_per_token", "bytes per token the source model would cache")
        self.compression_ratio = g("tucker_kv_compression_ratio", "source KV bytes per token / this model's")
        self.capacity_tokens = g("tucker_kv_capacity_tokens", "tokens the allocated KV cache holds")
        self.blocks_total = g("tucker_kv_blocks_total", "KV-cache blocks allocated by vLLM")
        self.blocks_used = g("tucker_kv_blocks_used", "KV-cache blocks in use")
        self.usage = g("tucker_kv_usage_ratio", "fraction of KV-cache blocks in use (0..1)")
        self.block_size = g("tucker_kv_block_size_tokens", "tokens per KV-cache block")
        self.running = g("tucker_requests_running", "requests being generated")
        self.waiting = g("tucker_requests_waiting", "requests queued for the engine")
        self.prompt_tokens = Counter("tucker_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("tucker_generation_tokens", "tokens generated", registry=r)
        self.preemptions = Counter("tucker_preemptions", "requests preempted for lack of KV cache", registry=r)
        self.requests = Counter("tucker_requests_finished", "requests finished", ["finish_reason"], registry=r)
        self.disconnects = Counter("tucker_client_disconnects", "requests aborted because the client went away",
                                   registry=r)
        self.ttft = Histogram("tucker_time_to_first_token_seconds", "time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tucker_inter_token_latency_seconds", "time between output tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("tucker_request_latency_seconds", "arrival to finish", buckets=LATENCY_BUCKETS,
                             registry=r)

    def set_layout(self, layout: MemoryLayout, num_blocks: int, block_size: int) -> None:
        self.bytes_per_token.set(layout.bytes_per_token)
        self.bytes_per_token_per_layer.set(layout.bytes_per_token_per_layer)
        self.source_bytes_per_token.set(layout.source_bytes_per_token)
        self.compression_ratio.set(layout.compression_ratio)
        self.blocks_total.set(num_blocks)
        self.block_size.set(block_size)
        self.capacity_tokens.set(num_blocks * block_size)


def stat_logger_factory(metrics: Metrics, layout: MemoryLayout):
    """A vLLM stat-logger factory (called as factory(vllm_config, engine_index)) feeding `metrics`."""

    class TuckerStatLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            cache = vllm_config.cache_config
            self.num_blocks, self.block_size = cache.num_gpu_blocks or 0, cache.block_size
            metrics.set_layout(layout, self.num_blocks, self.block_size)

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                metrics.last_usage = scheduler_stats.kv_cache_usage
                metrics.usage.set(scheduler_stats.kv_cache_usage)
                # vLLM keeps one null block out of use: usage counts the others.
                metrics.blocks_used.set(round(scheduler_stats.kv_cache_usage * max(self.num_blocks - 1, 0)))
                metrics.running.set(scheduler_stats.num_running_reqs)
                metrics.waiting.set(scheduler_stats.num_waiting_reqs)
            if iteration_stats is None:
                return
            metrics.prompt_tokens.inc(iteration_stats.num_prompt_tokens)
            metrics.generation_tokens.inc(iteration_stats.num_generation_tokens)
            metrics.preemptions.inc(iteration_stats.num_preempted_reqs)
            for t in iteration_stats.time_to_first_tokens_iter:
                metrics.ttft.observe(t)
            for t in iteration_stats.inter_token_latencies_iter:
                metrics.itl.observe(t)
            for done in iteration_stats.finished_requests:
                metrics.requests.labels(finish_reason=str(done.finish_reason or "unknown")).inc()
                metrics.e2e.observe(done.e2e_latency)

        def log_engine_initialized(self) -> None:
            pass

    return TuckerStatLogger
