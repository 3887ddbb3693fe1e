"""Helpers shared by test modules (no tests here): comparisons, the greedy reference loop, vLLM parity
against the reference model on token prompts, and paged-cache batches for the attention kernels."""

import torch

from tucker_serve.ops.paged import write_latent_cache

# vLLM parity
LOGPROB_TOL = 1e-4  # float32, absolute, on full-vocabulary log-probabilities
# paged batches: heads, latent key and value widths, block size
H, R3, RT3, BS = 6, 12, 20, 16


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
