"""KV-cache element types: each --kv-cache-dtype name, the element it stores, its size, whether it rounds.

Torch-free at import (cache_layout and the CLI count bytes without loading torch): a row names its
torch dtype, and `torch_dtype` looks it up when asked. Adding a cache dtype is one row in
CACHE_DTYPES plus its case in tests/test_cache_dtypes.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheDtype:
    """One --kv-cache-dtype value."""

    name: str
    storage: str  # the torch dtype of one stored number
    bytes: int
    # Narrower than any weights dtype: the latent is rounded to this grid (to nearest, saturating)
    # where the cache is written, and the reference model can round as the cache does.
    rounds: bool
    served: bool = True  # vLLM takes it as --kv-cache-dtype (float32 reaches our backend only via "auto")

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.storage)


CACHE_DTYPES = {d.name: d for d in (
    CacheDtype("float32", "float32", 4, rounds=False, served=False),
    CacheDtype("bfloat16", "bfloat16", 2, rounds=False),
    CacheDtype("float16", "float16", 2, rounds=False),
    CacheDtype("fp8", "float8_e4m3fn", 1, rounds=True),  # vLLM's fp8 is e4m3
    CacheDtype("fp8_e4m3", "float8_e4m3fn", 1, rounds=True),
    CacheDtype("fp8_e5m2", "float8_e5m2", 1, rounds=True),
)}
# Other spellings byte counts accept (torch's names and short forms), for the dtypes of weights too.
ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
           "float8_e4m3fn": "fp8_e4m3", "float8_e5m2": "fp8_e5m2"}


def lookup(dtype) -> CacheDtype:
    """The row of a name ('bfloat16', 'bf16', 'fp8') or a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    row = CACHE_DTYPES.get(ALIASES.get(name, name))
    if row is None:
        raise ValueError(f"unknown dtype {dtype!r}: known are {sorted([*CACHE_DTYPES, *ALIASES])}")
    return row


def resolve(kv_cache_dtype: str, model_dtype) -> str:
    """The element type vLLM allocates for a --kv-cache-dtype value: 'auto' follows the model's dtype."""
    return str(model_dtype).removeprefix("torch.") if kv_cache_dtype == "auto" else kv_cache_dtype


def served_names() -> tuple[str, ...]:
    """The --kv-cache-dtype values we serve: 'auto' and every row vLLM takes."""
    return ("auto", *(name for name, row in CACHE_DTYPES.items() if row.served))


def rounding_dtypes() -> dict:
    """name -> torch dtype of the rows whose cache rounds the latent (the fp8 ones)."""
    return {name: row.torch_dtype for name, row in CACHE_DTYPES.items() if row.rounds}
