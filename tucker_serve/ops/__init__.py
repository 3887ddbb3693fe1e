"""Attention kernels: PyTorch references (paged) and, where Triton is installed, GPU kernels."""
