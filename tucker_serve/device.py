"""Where conversion, evaluation and healing run the model: `--device auto|cuda|cuda:N|cpu` (auto:
CUDA when present), and healing's processes under torchrun (`ranks_on`).

The result does not depend on the device beyond float rounding: conversion sums its statistics in
float64 and computes every basis from those sums on the CPU.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tucker_serve.checkpoint import ModelError


def compute_device(name: str = "auto") -> torch.device:
    """The torch device for `name`; ModelError for a device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelError(f"--device {name!r} is not a device: use auto, cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {name}: no CUDA device is visible here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices are visible")
    if device.type not in ("cpu", "cuda"):
        raise ModelError(f"--device {name}: only cpu and cuda are supported")
    return device


HOST_MMAP_THRESHOLD = 4 * 2**20  # bytes: host allocations at least this large are their own mappings


def host_frees_returned() -> None:
    """Make freed host tensors of 4 MiB and more go back to the system at once, for the rest of this
    process (glibc's mallopt; elsewhere nothing). By default glibc raises its mmap threshold to the
    largest block freed so far (up to 32 MiB), and later blocks up to that size come from its heap,
    whose freed memory it keeps: conversion's per-layer temporaries then stay resident. Measured on
    the 1B-shape conversion (docs/bench/convert_memory.json): peak 3.18 GB against 3.27 GB, for about
    5% more time (docs/deploy.md, "Conversion memory")."""
    import ctypes

    libc = ctypes.CDLL(None)  # the symbols this process already has, the C library's among them
    if hasattr(libc, "gnu_get_libc_version"):  # glibc, whose M_MMAP_THRESHOLD is -3
        libc.mallopt(-3, HOST_MMAP_THRESHOLD)


def release(device: torch.device) -> None:
    """Hand cached GPU memory back (before vLLM sizes its cache from what is free)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Ranks:
    """This process among torchrun's (rank 0 of 1 when started alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first (it fills the cache folder), then the others (they read it)."""
        if not self.main:
            dist.barrier()
        yield
        if self.main and self.world > 1:
            dist.barrier()

    def agree(self, value: float) -> float:
        """Rank 0's value on every rank (a decision every rank must take alike, e.g. to stop)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, 0)
        return t.item()

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks."""
        if self.world == 1:
            return value.item()
        t = value.detach().double().cpu().reshape(1)
        dist.all_reduce(t)
        return t.item() / self.world


@contextmanager
def ranks_on(device: torch.device):
    """(Ranks, device) for the work of this process. Under torchrun (WORLD_SIZE > 1) it joins the
    process group for the block, NCCL on CUDA (each rank on the GPU LOCAL_RANK) and gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Ranks(), device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size()), device
        dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()
