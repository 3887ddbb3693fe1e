"""TUCKER attention backend for vLLM: one latent per token per layer in vLLM's paged cache.

vLLM hands each layer kv_cache (num_blocks, 1, block_size, r3 + rt3): the rotated latent key and
the latent value of every token, shared by all query heads (MQA with one KV head). In
shared-latent mode the cache holds only the unrotated latent (r3): keys are rotated from their
positions when read.

`forward` dispatches once per platform:
- CPU, r3 == rt3 a head size vLLM's C++ CPU attention supports: that kernel, fed one KV head
  (the cache is then laid out as that kernel wants: a block's keys, then its values);
- CPU otherwise (r3 != rt3, shared latent): the vectorised PyTorch ops of `tucker_serve.ops.paged`,
  rows of [key | value] per token;
- CUDA: the Triton paged decode kernel and vLLM's flash-attention for prefills (`tucker_vllm.gpu`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import KVCacheLayout

from tucker_serve.ops.paged import paged_attention, write_latent_cache

BACKEND_NAME = "TUCKER"
SHARED_BACKEND_NAME = "TUCKER_SHARED"
CPU_KERNEL_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def uses_cpu_kernel(device: torch.device, head_size: int, head_size_v: int) -> bool:
    """Whether a layer runs vLLM's C++ CPU attention (equal K/V widths it supports, on CPU).
    TUCKER_CPU_KERNEL=0 forces the PyTorch path (for comparisons)."""
    return (device.type == "cpu" and head_size == head_size_v and head_size in CPU_KERNEL_HEAD_SIZES
            and os.environ.get("TUCKER_CPU_KERNEL", "1") != "0")


def cpu_kernel_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size)


def split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ kernel's view of a block: block_size keys, then block_size values."""
    num_blocks, heads, block_size, _ = kv_cache.shape
    return kv_cache.view(num_blocks, heads, 2 * block_size, -1).chunk(2, dim=2)


@dataclass
class TuckerMetadata:
    num_actual_tokens: int
    query_start_loc: torch.Tensor  # (B+1,) int32
    seq_lens: torch.Tensor  # (B,) context length including this step's tokens
    block_table: torch.Tensor  # (B, max_blocks) int32
    slot_mapping: torch.Tensor  # (T,) int64, -1 = padding
    scheduler_metadata: torch.Tensor | None = None  # for the C++ CPU kernel


class TuckerMetadataBuilder(AttentionMetadataBuilder[TuckerMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from vllm.v1.attention.backends.utils import get_num_attention_heads_from_layers

        self.cpu_kernel = uses_cpu_kernel(torch.device(device), kv_cache_spec.head_size, kv_cache_spec.head_size_v)
        if self.cpu_kernel:
            self.num_heads = get_num_attention_heads_from_layers(vllm_config, layer_names)
            self.head_size, self.dtype = kv_cache_spec.head_size, vllm_config.model_config.dtype
            self.isa = cpu_kernel_isa(self.dtype, kv_cache_spec.block_size, self.head_size)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TuckerMetadata:
        m = common_attn_metadata
        meta = TuckerMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc[: m.num_reqs + 1],
            seq_lens=m.seq_lens[: m.num_reqs],
            block_table=m.block_table_tensor[: m.num_reqs],
            slot_mapping=m.slot_mapping,
        )
        if self.cpu_kernel:
            from vllm import _custom_ops as ops
            from vllm import envs

            meta.scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=m.num_reqs, num_heads=self.num_heads, num_kv_heads=1, head_dim=self.head_size,
                seq_lens=meta.seq_lens, dtype=self.dtype, query_start_loc=meta.query_start_loc, causal=True,
                sliding_window_size=-1, isa=self.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            )
        return meta


class TuckerAttentionImpl(AttentionImpl[TuckerMetadata]):
    """MQA over the shared latent: query (T, H, r3), key (T, 1, r3), value (T, 1, rt3)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "auto",
                 logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, latent_freqs: torch.Tensor | None = None,
                 **extra) -> None:
        if num_kv_heads not in (None, 1):
            raise ValueError(f"the TUCKER backend caches one latent per token, got num_kv_heads={num_kv_heads}")
        unsupported = {"alibi_slopes": alibi_slopes, "sliding_window": sliding_window,
                       "logits_soft_cap": logits_soft_cap, "kv_sharing_target_layer_name": kv_sharing_target_layer_name}
        for name, value in unsupported.items():
            if value:
                raise ValueError(f"the TUCKER backend does not support {name}")
        if attn_type != AttentionType.DECODER:
            raise ValueError(f"the TUCKER backend supports decoder attention only, got {attn_type}")
        if kv_cache_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"the TUCKER backend does not support kv_cache_dtype={kv_cache_dtype}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads, self.kv_cache_dtype = 1, kv_cache_dtype
        self.latent_freqs = latent_freqs  # shared-latent mode: rotate cached keys at read time
        self.isa: str | None = None  # set on first use when the C++ CPU kernel serves this layer

    def cpu_kernel(self, layer, kv_cache: torch.Tensor) -> bool:
        if self.isa is None and self.latent_freqs is None and uses_cpu_kernel(
                kv_cache.device, self.head_size, layer.head_size_v):
            self.isa = cpu_kernel_isa(kv_cache.dtype, kv_cache.shape[2], self.head_size)
        return self.isa is not None

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if kv_cache.numel() == 0:
            return
        if self.cpu_kernel(layer, kv_cache):
            from vllm import _custom_ops as ops

            key_cache, value_cache = split_cache(kv_cache)
            ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, self.isa)
            return
        n = slot_mapping.shape[0]
        value = None if self.latent_freqs is not None else value[:n, 0]
        write_latent_cache(kv_cache, key[:n, 0], value, slot_mapping)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: TuckerMetadata | None, output: torch.Tensor,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise ValueError("the TUCKER backend does not fuse output quantization")
        if attn_metadata is None:  # memory profiling: no cache, no metadata
            return output
        n, m = attn_metadata.num_actual_tokens, attn_metadata
        if self.cpu_kernel(layer, kv_cache):
            from vllm import _custom_ops as ops

            key_cache, value_cache = split_cache(kv_cache)
            ops.cpu_attention_with_kv_cache(
                query=query[:n], key_cache=key_cache, value_cache=value_cache, output=output[:n],
                query_start_loc=m.query_start_loc, seq_lens=m.seq_lens, scale=self.scale, causal=True,
                alibi_slopes=None, sliding_window=-1, block_table=m.block_table, softcap=0,
                scheduler_metadata=m.scheduler_metadata, s_aux=None,
            )
            return output
        freqs = self.latent_freqs
        if freqs is not None and freqs.device != query.device:
            freqs = self.latent_freqs = freqs.to(query.device)
        if query.is_cuda:
            from tucker_vllm.gpu import gpu_attention

            gpu_attention(query[:n], kv_cache, m, self.scale, output[:n], freqs)
        else:
            paged_attention(query[:n], kv_cache, m.query_start_loc, m.seq_lens, m.block_table,
                            self.scale, output[:n], freqs)
        return output


class TuckerAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.bfloat16, torch.float16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float32", "bfloat16", "float16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[TuckerAttentionImpl]:
        return TuckerAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[TuckerMetadataBuilder]:
        return TuckerMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)


class TuckerSharedLatentBackend(TuckerAttentionBackend):
    """Shared-latent mode: one unrotated latent (r3 numbers) per token is both key and value."""

    @staticmethod
    def get_name() -> str:
        return SHARED_BACKEND_NAME

    @classmethod
    def customize_spec(cls, spec):
        # The layer outputs r3 values per head, but the cache stores no separate value.
        return replace(spec, head_size_v=0)
