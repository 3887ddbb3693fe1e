"""Benchmarks of tucker-serve: KV capacity, decode speed and quality through real vLLM engines
(`engine`), and load on the HTTP server (`serving`). `tucker-serve bench` runs them."""

from tucker_bench.engine import BenchOptions, run

__all__ = ["BenchOptions", "run"]
