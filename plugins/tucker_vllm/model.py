"""TuckerLlamaForCausalLM for vLLM: Llama blocks whose attention caches one latent per token.

Per layer: shared query projection (U2), per-head cores (B_h) to latent queries, latent key (U3)
and value (Ut3) projections, latent RoPE with the checkpoint's per-pair frequencies, attention by
the TUCKER backend, per-head output cores (Bt_h) and the output fold (Ut2). Query heads and the
output fold are sharded over tensor-parallel ranks; the latent projections and cache are replicated.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, make_layers, maybe_prefix
from vllm.model_executor.utils import set_weight_attrs
from vllm.sequence import IntermediateTensors

from tucker_serve.model import TuckerModelConfig, checked_tensors
from tucker_serve.rope import apply_rope, rope_cos_sin
from tucker_vllm.backend import TuckerAttentionBackend, TuckerSharedLatentBackend


def head_shards(num_heads: int) -> tuple[int, int]:
    """(heads on this rank, first head of this rank) under tensor parallelism."""
    tp = get_tensor_model_parallel_world_size()
    if num_heads % tp:
        raise ValueError(f"num_attention_heads={num_heads} is not divisible by tensor_parallel_size={tp}")
    local = num_heads // tp
    return local, get_tensor_model_parallel_rank() * local


def sharded_core(num_heads: int, first: int, shape: tuple[int, ...]) -> nn.Parameter:
    """A per-head core parameter (local heads, ...) that loads its slice of the full tensor."""
    param = nn.Parameter(torch.empty(num_heads, *shape), requires_grad=False)

    def load(p: nn.Parameter, full: torch.Tensor) -> None:
        p.data.copy_(full.narrow(0, first, num_heads))

    set_weight_attrs(param, {"weight_loader": load})
    return param


class TuckerLlamaAttention(nn.Module):
    def __init__(self, cfg: TuckerModelConfig, layer: int, cache_config, quant_config, prefix: str) -> None:
        super().__init__()
        c = cfg.attention
        self.heads, first = head_shards(c.num_heads)
        self.block_core, self.r3, self.rt3 = cfg.block_core, c.r3, c.rt3
        self.shared = c.shared_latent
        q_in = c.r2 // c.num_heads if cfg.block_core else c.r2
        o_out = c.rt2 // c.num_heads if cfg.block_core else c.rt2
        bias = cfg.qkv_bias
        if cfg.block_core:  # head h owns its r2/H slice: shard the projection with the heads
            self.q_shared = ColumnParallelLinear(c.hidden_size, c.r2, bias=bias, prefix=f"{prefix}.q_shared")
            self.o_shared = RowParallelLinear(c.rt2, c.hidden_size, bias=False, prefix=f"{prefix}.o_shared")
        else:
            self.q_shared = ReplicatedLinear(c.hidden_size, c.r2, bias=bias, prefix=f"{prefix}.q_shared")
            self.o_shared = ReplicatedLinear(c.rt2, c.hidden_size, bias=False, prefix=f"{prefix}.o_shared")
        self.q_core = sharded_core(self.heads, first, (q_in, c.r3))
        self.o_core = sharded_core(self.heads, first, (o_out, c.rt3))
        self.k_latent = ReplicatedLinear(c.hidden_size, c.r3, bias=bias, prefix=f"{prefix}.k_latent")
        self.v_latent = None if self.shared else ReplicatedLinear(
            c.hidden_size, c.rt3, bias=bias, prefix=f"{prefix}.v_latent")
        freqs = torch.tensor(cfg.latent_rope_freqs[layer], dtype=torch.float64)
        self.register_buffer("latent_freqs", freqs, persistent=False)
        backend_args = {"attn_backend": TuckerSharedLatentBackend, "latent_freqs": freqs} if self.shared else {
            "attn_backend": TuckerAttentionBackend}
        self.attn = Attention(
            num_heads=self.heads, head_size=c.r3, scale=cfg.softmax_scale, num_kv_heads=1,
            head_size_v=c.rt3, cache_config=cache_config, quant_config=quant_config,
            prefix=f"{prefix}.attn", **backend_args,
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qs, _ = self.q_shared(hidden)  # (T, r2 / tp) or (T, r2)
        if self.block_core:
            q = torch.einsum("thr,hrs->ths", qs.unflatten(-1, (self.heads, -1)), self.q_core)
        else:
            q = torch.einsum("tr,hrs->ths", qs, self.q_core)  # (T, H_local, r3)
        latent, _ = self.k_latent(hidden)  # (T, r3)
        cos, sin = rope_cos_sin(self.latent_freqs, positions)  # (T, r3/2)
        q = apply_rope(q, cos[:, None], sin[:, None])
        if self.shared:  # the backend caches the unrotated latent and rotates keys when reading
            k = v = latent
        else:
            k, v = apply_rope(latent, cos, sin), self.v_latent(hidden)[0]
        y = self.attn(q.flatten(1), k, v).unflatten(-1, (self.heads, self.rt3))  # (T, H_local, rt3)
        if self.block_core:
            z = torch.einsum("ths,hos->tho", y, self.o_core).flatten(1)  # (T, rt2 / tp)
            return self.o_shared(z)[0]
        out = self.o_shared(torch.einsum("ths,hos->to", y, self.o_core))[0]
        return tensor_model_parallel_all_reduce(out) if get_tensor_model_parallel_world_size() > 1 else out


class TuckerDecoderLayer(nn.Module):
    def __init__(self, cfg: TuckerModelConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        layer = int(prefix.rsplit(".", 1)[-1])
        self.self_attn = TuckerLlamaAttention(cfg, layer, vllm_config.cache_config,
                                              vllm_config.quant_config, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(cfg.hidden_size, cfg.intermediate_size, "silu",
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
        cfg = tucker_config(vllm_config)
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


def tucker_config(vllm_config: VllmConfig) -> TuckerModelConfig:
    hf = vllm_config.model_config.hf_config
    return TuckerModelConfig.from_dict(hf.to_dict(), where=f"{vllm_config.model_config.model}/config.json")


class TuckerLlamaForCausalLM(nn.Module):
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_stacked={
        ".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1)})

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        self.cfg = tucker_config(vllm_config)
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
        return AutoWeightsLoader(self).load_weights(checked_tensors(self.cfg, weights, self.where),
                                                    mapper=self.hf_to_vllm_mapper)

