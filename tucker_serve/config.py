"""Tucker attention shapes: the ranks of the two factorized weight tensors, validated once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TuckerConfig:
    """Ranks of a Tucker attention layer.

    Pre-softmax tensor T (H, d, d), modes (head, query, key): ranks (r1, r2, r3).
    Post-softmax tensor Tt (H, d, d), modes (head, output, value): ranks (rt1, rt2, rt3).
    `rope` turns on latent RoPE over the r3-dim latent key (r3 must then be even);
    `shared_latent` caches only the key latent and uses it, unrotated, as the value (rt3 == r3).
    """

    hidden_size: int
    num_heads: int
    r1: int
    r2: int
    r3: int
    rt1: int
    rt2: int
    rt3: int
    rope: bool = True
    shared_latent: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "r1", "r2", "r3", "rt1", "rt2", "rt3"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        limits = {"r1": ("num_heads", self.num_heads), "rt1": ("num_heads", self.num_heads)}
        for name in ("r2", "r3", "rt2", "rt3"):
            limits[name] = ("hidden_size", self.hidden_size)
        for name, (mode, size) in limits.items():
            if getattr(self, name) > size:
                raise ValueError(f"{name}={getattr(self, name)} exceeds its mode size {mode}={size}")
        if self.rope and self.r3 % 2:
            raise ValueError(f"r3={self.r3} must be even when latent RoPE is on (rotate-half pairs)")
        if self.shared_latent and self.rt3 != self.r3:
            raise ValueError(f"rt3={self.rt3} must equal r3={self.r3} in shared-latent mode")

    @property
    def pre_ranks(self) -> tuple[int, int, int]:
        return (self.r1, self.r2, self.r3)

    @property
    def post_ranks(self) -> tuple[int, int, int]:
        return (self.rt1, self.rt2, self.rt3)
