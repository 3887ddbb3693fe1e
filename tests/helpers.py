"""Helpers shared by test modules (no tests here): comparisons, the greedy reference loop, vLLM parity
against the reference model on token prompts, paged-cache batches for the attention kernels, dense
attention written the textbook way (the oracles the Tucker forms must reproduce), a tiny random
Tucker checkpoint and a tiny random transformers source."""

import json
import shutil
from pathlib import Path

import torch

from tucker_serve.checkpoint import ARCHITECTURE, TuckerModelConfig
from tucker_serve.model import TuckerLlama
from tucker_serve.ops.paged import write_latent_cache
from tucker_serve.rope import apply_rope, default_inv_freq, rope_cos_sin

# vLLM parity
LOGPROB_TOL = 1e-4  # float32, absolute, on full-vocabulary log-probabilities (tiny models)
# A real model's float32 log-probabilities reach -45 through 30 layers: on SmolLM2 2x the float32
# reference itself lies up to 1.0e-4 from the float64 one, and vLLM 0.6-1.0e-4 (measured on the three
# parity prompts). Real models are compared with a float64 reference, at twice float32's own error;
# a wrong map, width or rotation costs 1e-2 or more.
REAL_LOGPROB_TOL = 2e-4
# paged batches: heads, latent key and value widths, block size
H, R3, RT3, BS = 6, 12, 20, 16


def kl_per_token(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> float:
    """Mean over positions of KL(teacher || student), from log-probabilities (..., V)."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean().item()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to b's largest entry, in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def greedy(reference, ids: list[int], new_tokens: int) -> list[int]:
    """The reference model's greedy continuation of `ids` (new tokens only), one full forward per token."""
    seq = list(ids)
    for _ in range(new_tokens):
        seq.append(int(reference(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


def prompts(lengths, seed, vocab: int = 256):
    """Random token prompts of the given lengths (ids 2..vocab-1: 0 and 1 are BOS/EOS)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def run(llm, token_lists, max_tokens=6, prompt_logprobs=True):
    """Greedy generation with full-vocabulary log-probs (and prompt log-probs) from a vLLM engine."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=-1, ignore_eos=True,
                            prompt_logprobs=-1 if prompt_logprobs else None, detokenize=False)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in token_lists], params, use_tqdm=False)


def max_logprob_error(reference, prompt, output) -> tuple[float, int]:
    """Largest |vLLM - reference| over every vocabulary entry of every prompt and output position."""
    generated = list(output.outputs[0].token_ids)
    with torch.no_grad():
        ref = reference(torch.tensor([prompt + generated])).log_softmax(-1)[0]
    prompt_rows = output.prompt_logprobs or [None] * len(prompt)  # absent when not requested
    rows = [(p - 1, prompt_rows[p]) for p in range(1, len(prompt)) if prompt_rows[p] is not None]
    rows += [(len(prompt) + j - 1, d) for j, d in enumerate(output.outputs[0].logprobs)]
    worst, entries = 0.0, 0
    for pos, logprobs in rows:
        ids = torch.tensor(list(logprobs.keys()))
        got = torch.tensor([lp.logprob for lp in logprobs.values()])
        worst = max(worst, (got - ref[pos, ids]).abs().max().item())
        entries += len(ids)
    return worst, entries


def make_batch(ctx_lens, q_lens, dtype, seed=0):
    """A cache with shuffled blocks holding every request's latents; queries for the new tokens."""
    g = torch.Generator().manual_seed(seed)
    blocks_per = [-(-c // BS) for c in ctx_lens]
    num_blocks = sum(blocks_per) + 3
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(ctx_lens), max(blocks_per), dtype=torch.int32)
    cache = torch.randn(num_blocks, 1, BS, R3 + RT3, generator=g, dtype=dtype)  # junk everywhere
    keys, values, used = [], [], 0
    for i, (c, nb) in enumerate(zip(ctx_lens, blocks_per)):
        table[i, :nb] = perm[used: used + nb]
        used += nb
        k, v = torch.randn(c, R3, generator=g, dtype=dtype), torch.randn(c, RT3, generator=g, dtype=dtype)
        slots = table[i, torch.arange(c) // BS].long() * BS + torch.arange(c) % BS
        write_latent_cache(cache, k, v, slots)
        keys.append(k)
        values.append(v)
    q = torch.randn(sum(q_lens), H, R3, generator=g, dtype=dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return cache, table, keys, values, q, qsl


# Dense attention written the textbook way: the oracles the Tucker forms must reproduce.

def _causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    T = scores.shape[-1]
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1)


def gqa_attention(x, Wq, Wk, Wv, Wo, inv_freq, positions):
    """Llama attention with per-head rotate-half RoPE; x (T, d), Wq (H, d, D), Wk/Wv (G, d, D), Wo (H, D, d)."""
    H, _, D = Wq.shape
    rep = H // Wk.shape[0]
    cos, sin = rope_cos_sin(inv_freq, positions)  # (T, D/2)
    out = torch.zeros_like(x)
    for h in range(H):
        g = h // rep
        q = apply_rope(x @ Wq[h], cos, sin)
        k = apply_rope(x @ Wk[g], cos, sin)
        a = _causal_softmax(q @ k.T / D**0.5)
        out = out + a @ (x @ Wv[g]) @ Wo[h]
    return out


def mla_attention(x, W_dq, W_uq, W_dkv, W_uk, W_uv, Wo, inv_freq, positions):
    """MLA with RoPE on the latent: the up-projected query is absorbed into the latent space,
    both are rotated there, and values are read from the unrotated latent."""
    D = W_uq.shape[-1]
    c_q, c_kv = x @ W_dq, x @ W_dkv
    cos, sin = rope_cos_sin(inv_freq, positions)
    k = apply_rope(c_kv, cos, sin)
    out = torch.zeros_like(x)
    for h in range(W_uq.shape[0]):
        q = apply_rope(c_q @ W_uq[h] @ W_uk[h].T, cos, sin)
        a = _causal_softmax(q @ k.T / D**0.5)
        out = out + a @ (c_kv @ W_uv[h]) @ Wo[h]
    return out


# A tiny random Tucker checkpoint: dense (non-block) cores by default, r3 != rt3, biases, untied head.
# It exercises the general Tucker path that converted Llama checkpoints (block cores) do not. Its
# vocabulary is 256 token ids and it has no tokenizer (engines run with skip_tokenizer_init).

LAYERS, HIDDEN, HEADS, VOCAB = 2, 64, 4, 256
RANKS = dict(r1=4, r2=32, r3=12, rt1=3, rt2=48, rt3=20)


def tiny_config(shared_latent: bool = False, block_core: bool = False, ranks: dict | None = None) -> dict:
    ranks = ranks or (dict(RANKS, rt3=RANKS["r3"]) if shared_latent else RANKS)
    r3 = ranks["r3"] if isinstance(ranks["r3"], list) else [ranks["r3"]] * LAYERS  # per layer or one for all
    freqs = [(default_inv_freq(r3[i], 500.0) * (1 + 0.1 * i)).tolist() for i in range(LAYERS)]
    return {
        "architectures": [ARCHITECTURE], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": 128, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 1024, "tie_word_embeddings": False,
        "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1, "dtype": "float32",
        "tucker": {**ranks, "block_core": block_core, "shared_latent": shared_latent, "qkv_bias": True,
                   "softmax_scale": 0.35, "source_kv_width": 2 * HIDDEN, "latent_rope_freqs": freqs},
    }


def write_tiny_checkpoint(folder: Path, seed: int = 0, shared_latent: bool = False, block_core: bool = False,
                          ranks: dict | None = None) -> Path:
    """Random weights scaled so that logits vary by a few nats; returns the folder."""
    from safetensors.torch import save_file

    config = tiny_config(shared_latent, block_core, ranks)
    torch.manual_seed(seed)
    model = TuckerLlama(TuckerModelConfig.from_dict(config))
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = 1 + 0.1 * torch.randn_like(p)
        else:
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            state[name] = torch.randn_like(p) * (0.3 if p.dim() == 1 else 1.5 / fan_in**0.5)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# A tiny random transformers source with SmolLM2's tokenizer (same vocabulary size)
TINY_SOURCE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2, rms_norm_eps=1e-6,
                   tie_word_embeddings=False)


def save_source(model, folder: Path, tokenizer_from: Path) -> Path:
    """Save a transformers model as a source folder with the tokenizer files of `tokenizer_from`."""
    model.save_pretrained(folder)
    for f in tokenizer_from.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, folder / f.name)
    return folder
