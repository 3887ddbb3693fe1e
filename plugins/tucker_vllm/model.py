"""TuckerLlamaForCausalLM for vLLM: Llama blocks whose attention caches one latent per token.

Per layer: latent queries per head (U2 B_h), the latent key (U3) and value (Ut3), latent RoPE with
the checkpoint's per-pair frequencies, attention over the latent, and the output map (Bt_h then
Ut2). The factors are folded at load time into one QKV projection with a single KV head and one
output projection. Query heads and the output are sharded over tensor-parallel ranks; the latent
key/value projections and the latent cache are replicated on every rank.

A latent with equal key and value widths is plain MQA with head size r3: such layers use the
attention backend vLLM selects itself (its C++ kernel on CPU, flash-attention on CUDA, with their
cache dtypes and graphs); the TUCKER backend serves the rest (r3 != rt3, shared latents).

vLLM's CPU kernel stores an fp8 cache by truncating toward zero (vLLM 0.32): every cached number
shrinks, by 4.5% on average in e4m3. Those layers round their latent key and value to the fp8 grid
(to nearest) before vLLM stores them, so its store is exact and the cache holds what the TUCKER
backend and the reference model hold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, make_layers, maybe_prefix
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors
from vllm.v1.attention.selector import get_attn_backend

from tucker_serve.checkpoint import TuckerModelConfig
from tucker_serve.families import HIDDEN_ACT
from tucker_serve.fold import fold_output, fold_query
from tucker_serve.model import checked_tensors
from tucker_serve.ops.paged import round_to_cache
from tucker_serve.rope import rope_cos_sin
from tucker_vllm import attention_mode
from tucker_vllm.backend import READ_AS, TuckerAttentionBackend, TuckerSharedLatentBackend


def head_shards(num_heads: int) -> tuple[int, int]:
    """(heads on this rank, first head of this rank) under tensor parallelism."""
    tp = get_tensor_model_parallel_world_size()
    if num_heads % tp:
        raise ValueError(f"num_attention_heads={num_heads} is not divisible by tensor_parallel_size={tp}")
    local = num_heads // tp
    return local, get_tensor_model_parallel_rank() * local


class Factors(nn.Module):
    """The checkpoint's Tucker factors of one layer, held only until `fold` packs them."""

    def __init__(self, cfg: TuckerModelConfig, layer: int) -> None:
        super().__init__()
        c, block = cfg.layers[layer], cfg.block_core
        q_in = c.r2 // c.num_heads if block else c.r2
        o_out = c.rt2 // c.num_heads if block else c.rt2
        param = lambda *shape: nn.Parameter(torch.empty(*shape), requires_grad=False)
        self.q_shared, self.k_latent, self.o_shared = nn.Module(), nn.Module(), nn.Module()
        self.q_shared.weight, self.k_latent.weight = param(c.r2, c.hidden_size), param(c.r3, c.hidden_size)
        self.o_shared.weight = param(c.hidden_size, c.rt2)
        self.q_core, self.o_core = param(c.num_heads, q_in, c.r3), param(c.num_heads, o_out, c.rt3)
        if not c.shared_latent:
            self.v_latent = nn.Module()
            self.v_latent.weight = param(c.rt3, c.hidden_size)
        if cfg.qkv_bias:
            self.q_shared.bias, self.k_latent.bias = param(c.r2), param(c.r3)
            if not c.shared_latent:
                self.v_latent.bias = param(c.rt3)


class LatentRotaryEmbedding(RotaryEmbedding):
    """vLLM's rotary op (rotate-half) over the r3-dim latent, with one frequency per latent pair from
    the checkpoint instead of a base-theta schedule; its table is computed in float64, as the
    reference model's."""

    def __init__(self, freqs: torch.Tensor, max_positions: int, dtype: torch.dtype) -> None:
        self.latent_freqs = freqs
        r3 = 2 * freqs.numel()
        super().__init__(r3, r3, max_positions, base=0.0, is_neox_style=True, dtype=dtype)

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        cos, sin = rope_cos_sin(self.latent_freqs, torch.arange(self.max_position_embeddings))
        return torch.cat((cos, sin), -1).float()

    def forward_cpu(self, positions, query, key=None):
        # vLLM's C++ CPU kernel rotates in vectors of 8 pairs: with bfloat16 a latent of 27 pairs
        # (SmolLM2 at 4x, r3 = 54) crashed it (segfault in BF16Vec8::save). Other widths take
        # vLLM's PyTorch version of the same op.
        if (self.rotary_dim // 2) % 8:
            return self.forward_native(positions, query, key)
        return super().forward_cpu(positions, query, key)


def latent_backend(r3: int, rt3: int, shared: bool, kv_cache_dtype: str):
    """None (vLLM selects its own backend) for plain MQA latents it supports; else a TUCKER backend.
    TUCKER_ATTENTION=tucker forces the TUCKER backend on every layer (for comparisons; `attention_mode`)."""
    if shared:
        return TuckerSharedLatentBackend
    if r3 == rt3 and attention_mode() == "auto":
        try:
            if get_attn_backend(r3, torch.get_default_dtype(), kv_cache_dtype).supports_head_size(r3):
                return None
        except ValueError:  # no vLLM backend for this head size, dtype or cache dtype
            pass
    return TuckerAttentionBackend


class TuckerLlamaAttention(nn.Module):
    """Serves a Tucker layer as MQA over the latent: at load time the shared query projection and
    the per-head cores fold into one per-head latent query map (a QKV projection with one KV head
    of widths r3 and rt3) and the output cores and fold into one output projection."""

    def __init__(self, cfg: TuckerModelConfig, layer: int, max_positions: int, cache_config, quant_config,
                 prefix: str) -> None:
        super().__init__()
        c = cfg.layers[layer]  # latent widths may differ from layer to layer
        self.heads, _ = head_shards(c.num_heads)
        self.block_core, self.r3, self.rt3, self.shared = cfg.block_core, c.r3, c.rt3, c.shared_latent
        self.factors = Factors(cfg, layer)
        # With one KV head and tp > 1, vLLM replicates the latent key/value on every rank (as for MLA).
        self.qkv_proj = QKVParallelLinear(c.hidden_size, c.r3, c.num_heads, 1, bias=cfg.qkv_bias,
                                          v_head_size=c.rt3, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(c.num_heads * c.rt3, c.hidden_size, bias=False, prefix=f"{prefix}.o_proj")
        freqs = torch.tensor(cfg.latent_rope_freqs[layer], dtype=torch.float64)
        self.rotary_emb = LatentRotaryEmbedding(freqs, max_positions, torch.get_default_dtype())
        cache_dtype = cache_config.cache_dtype if cache_config else "auto"
        backend = latent_backend(c.r3, c.rt3, self.shared, cache_dtype)
        # fp8 element type to round to before vLLM's CPU kernel stores (it truncates); None: no rounding.
        # Tucker checkpoints carry no cache scales, so vLLM stores with unit scales.
        self.round_to = READ_AS.get(cache_dtype) if backend is None and current_platform.is_cpu() else None
        extra = {"latent_freqs": freqs} if self.shared else {}  # shared latent: keys rotate when read
        self.attn = Attention(
            num_heads=self.heads, head_size=c.r3, scale=cfg.softmax_scale, num_kv_heads=1,
            head_size_v=c.rt3, cache_config=cache_config, quant_config=quant_config,
            prefix=f"{prefix}.attn", attn_backend=backend, **extra,
        )

    @torch.no_grad()
    def fold(self) -> None:
        """Pack the loaded factors into qkv_proj and o_proj (each rank takes its heads), then drop them."""
        f = self.factors
        q_weight, q_bias = fold_query(f.q_shared.weight, getattr(f.q_shared, "bias", None), f.q_core, self.block_core)
        v_src = f.k_latent if self.shared else f.v_latent  # shared latent: the value is the key latent
        load = lambda param, tensor, shard: param.weight_loader(param, tensor.to(param.dtype), shard)
        load(self.qkv_proj.weight, q_weight, "q")
        load(self.qkv_proj.weight, f.k_latent.weight, "k")
        load(self.qkv_proj.weight, v_src.weight, "v")
        if q_bias is not None:
            load(self.qkv_proj.bias, q_bias, "q")
            load(self.qkv_proj.bias, f.k_latent.bias, "k")
            load(self.qkv_proj.bias, v_src.bias, "v")
        out = fold_output(f.o_shared.weight, f.o_core, self.block_core).to(self.o_proj.weight.dtype)
        self.o_proj.weight.weight_loader(self.o_proj.weight, out)
        del self.factors

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.heads * self.r3, self.r3, self.rt3], dim=-1)
        # shared latent: the cached key stays unrotated (rotated when read)
        q, rotated = self.rotary_emb(positions, q, None if self.shared else k)
        k = k if self.shared else rotated
        if self.round_to is not None:
            k, v = round_to_cache(k, self.round_to), round_to_cache(v, self.round_to)
        out, _ = self.o_proj(self.attn(q, k, k if self.shared else v))
        return out


class TuckerDecoderLayer(nn.Module):
    def __init__(self, cfg: TuckerModelConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        layer = int(prefix.rsplit(".", 1)[-1])
        self.self_attn = TuckerLlamaAttention(cfg, layer, vllm_config.model_config.max_model_len,
                                              vllm_config.cache_config, vllm_config.quant_config, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(cfg.hidden_size, cfg.intermediate_size, HIDDEN_ACT,
                            quant_config=vllm_config.quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, positions, hidden, residual):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


@support_torch_compile(dynamic_arg_dims={
    "input_ids": 0, "positions": 0, "intermediate_tensors": 0, "inputs_embeds": 0})
class TuckerLlamaModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        cfg = model_config(vllm_config)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            cfg.num_layers, lambda prefix: TuckerDecoderLayer(cfg, vllm_config, prefix), prefix=f"{prefix}.layers")
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers[self.start_layer: self.end_layer]:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


def model_config(vllm_config: VllmConfig) -> TuckerModelConfig:
    """The checkpoint's config.json, parsed by the core's one parser."""
    hf = vllm_config.model_config.hf_config
    return TuckerModelConfig.from_dict(hf.to_dict(), where=f"{vllm_config.model_config.model}/config.json")


class TuckerLlamaForCausalLM(nn.Module):
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1)},
        orig_to_new_regex={re.compile(r"\.self_attn\.(q_shared|q_core|k_latent|v_latent|o_core|o_shared)"):
                           r".self_attn.factors.\1"},
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        self.cfg = model_config(vllm_config)
        self.where = vllm_config.model_config.model
        self.model = TuckerLlamaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(self.cfg.vocab_size, self.cfg.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if self.cfg.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(self.cfg.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        AutoWeightsLoader(self).load_weights(checked_tensors(self.cfg, weights, self.where),
                                             mapper=self.hf_to_vllm_mapper)
        for layer in self.model.layers[self.model.start_layer: self.model.end_layer]:
            layer.self_attn.fold()
        # Every parameter left is loaded: checked_tensors failed on any missing tensor, and the
        # folded projections were filled from the factors.
        return {name for name, _ in self.named_parameters()}

