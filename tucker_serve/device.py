"""Where conversion and evaluation run the model: `--device auto|cuda|cuda:N|cpu` (auto: CUDA when present).

The result does not depend on the device beyond float rounding: conversion sums its statistics in
float64 and computes every basis from those sums on the CPU.
"""

from __future__ import annotations

import torch

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


def release(device: torch.device) -> None:
    """Hand cached GPU memory back (before vLLM sizes its cache from what is free)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
