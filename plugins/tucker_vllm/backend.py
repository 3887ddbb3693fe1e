"""TUCKER attention backend for vLLM: one latent per token per layer in vLLM's paged cache, for the
latents vLLM's own backends cannot hold: unequal key and value widths (r3 != rt3) and shared latents.
(Equal widths are plain MQA: the model hands those layers to vLLM's own backend.)

vLLM hands each layer kv_cache (num_blocks, 1, block_size, r3 + rt3): rows of [rotated latent key |
latent value] per token, shared by all query heads (MQA with one KV head). In shared-latent mode the
cache holds only the unrotated latent (r3): keys are rotated from their positions when read.

Attention is `tucker_serve.ops.paged.paged_attention` on every platform; only the batched decode
routine differs (`decode_routine`: the Triton paged decode kernel on CUDA, PyTorch elsewhere), chosen
at a layer's first forward from the query's device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import KVCacheLayout

from tucker_serve.cache_dtypes import CACHE_DTYPES, rounding_dtypes
from tucker_serve.ops.paged import PagedBatch, decode_routine, paged_attention, write_latent_cache

BACKEND_NAME = "TUCKER"
SHARED_BACKEND_NAME = "TUCKER_SHARED"
KV_CACHE_DTYPES = ("auto", *CACHE_DTYPES)  # "auto": the model's dtype
READ_AS = rounding_dtypes()  # vLLM allocates fp8 caches as uint8: the element type they are read as


@dataclass(frozen=True)
class TuckerMetadata(PagedBatch):
    num_actual_tokens: int = 0


class TuckerMetadataBuilder(AttentionMetadataBuilder[TuckerMetadata]):
    # The metadata holds host-side lengths that loops read: a captured CUDA graph would replay stale
    # ones, so vLLM runs these layers outside its graphs (piecewise) and graphs the rest.
    _cudagraph_support = AttentionCGSupport.NEVER
    reorder_batch_threshold = 1  # vLLM puts the decodes first in every batch

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TuckerMetadata:
        """The step's decode/prefill split and host-side lengths, once for all layers."""
        m = common_attn_metadata
        num_decodes, _, _, _ = split_decodes_and_prefills(m, decode_threshold=1)
        host_lens = m.seq_lens_cpu_upper_bound if m.seq_lens_cpu_upper_bound is not None else m.seq_lens.cpu()
        return TuckerMetadata(
            num_decodes=num_decodes,
            query_start_loc=m.query_start_loc_cpu[: m.num_reqs + 1].tolist(),
            context_lens=host_lens[: m.num_reqs].tolist(),
            seq_lens=m.seq_lens[: m.num_reqs],
            block_table=m.block_table_tensor[: m.num_reqs],
            num_actual_tokens=m.num_actual_tokens,
        )


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
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"the TUCKER backend does not support kv_cache_dtype={kv_cache_dtype}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads, self.kv_cache_dtype = 1, kv_cache_dtype
        self.fp8 = READ_AS.get(kv_cache_dtype)  # None: the cache is read in its own dtype
        self.latent_freqs = latent_freqs  # shared-latent mode: rotate cached keys at read time
        self.decode = None  # the batched decode routine, chosen at the first forward (decode_routine)

    def scales(self, layer) -> tuple[float, float]:
        """vLLM's per-layer cache scales (stored = value / scale); a shared latent uses the key's for both."""
        if self.fp8 is None:
            return 1.0, 1.0
        return layer._k_scale_float, layer._k_scale_float if self.latent_freqs is not None else layer._v_scale_float

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if kv_cache.numel() == 0:
            return
        n = slot_mapping.shape[0]
        k_scale, v_scale = self.scales(layer)
        key, value = key[:n, 0] / k_scale, None if self.latent_freqs is not None else value[:n, 0] / v_scale
        write_latent_cache(kv_cache.view(self.fp8) if self.fp8 else kv_cache, key, value, slot_mapping)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: TuckerMetadata | None, output: torch.Tensor,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise ValueError("the TUCKER backend does not fuse output quantization")
        if attn_metadata is None:  # memory profiling: no cache, no metadata
            return output
        n, m = attn_metadata.num_actual_tokens, attn_metadata
        freqs = self.latent_freqs
        if freqs is not None and freqs.device != query.device:
            freqs = self.latent_freqs = freqs.to(query.device)
        # An fp8 cache holds key / k_scale and value / v_scale: fold k_scale into the softmax scale
        # (scores are linear in the key) and v_scale into the output (linear in the value).
        k_scale, v_scale = self.scales(layer)
        cache = kv_cache.view(self.fp8) if self.fp8 else kv_cache
        if self.decode is None:
            self.decode = decode_routine(query.device)
        paged_attention(query[:n], cache, m, self.scale * k_scale, output[:n], freqs, decode=self.decode)
        if v_scale != 1.0:
            output[:n] *= v_scale
        return output


class TuckerAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.bfloat16, torch.float16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(KV_CACHE_DTYPES)

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
