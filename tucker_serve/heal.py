"""Healing: distil the source model into a converted one, training only the attention factors.

Training data, never the evaluation splits or prompts: calibration text (wiki, news) and, for
sequence-level distillation, chats of healing prompts (`tucker_serve.chat.heal_prompts`) with the
source model's own greedy answers, generated first and packed into one token stream. `chat` sets
the share of training windows drawn from the chats (0: text only, 1: chats only).

Two phases:
1. local: each layer's Tucker attention learns to reproduce the source attention's output on the
   source model's own activations (cached once; cheap, no LM head, layers independent);
2. global: KL(source || Tucker) at every position of training windows, for the rest of the step
   or time budget, everything but the attention factors frozen. By default the source runs on
   every step's fresh windows (full-vocabulary KL). With `teacher_windows=N` its outputs on a pool
   of N windows are computed once instead (top-k log-probs, kept in the cache folder for later
   runs; `tucker_serve.teacher`) and training passes over the pool: faster steps, but windows seen
   again and again, which cost held-out quality in every cold-pool heal measured (docs/quality.md,
   "Healing per CPU-minute"); it pays when a pool computed by an earlier heal is read back.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tucker_serve.chat import can_chat, source_chats
from tucker_serve.evaluate import perplexity, text_windows
from tucker_serve.model import TuckerLlama
from tucker_serve.cache_dtypes import rounding_dtypes
from tucker_serve.checkpoint import ModelError, read_config, write_folder
from tucker_serve.options import cite, invalid, option, options_record
from tucker_serve.teacher import TeacherTargets, pool_path, topk_kl
from tucker_serve.device import Ranks, compute_device, ranks_on, release
from tucker_serve.sources import load_source, load_tokenizer, resolve
from tucker_serve.text import load_text, text_tokens

TRAINED = ("q_core", "k_latent", "v_latent", "o_core")
LOCAL_WINDOW = 512


@dataclass(frozen=True)
class HealOptions:
    # Exactly one of steps or minutes.
    steps: int | None = option(None, int, "KL steps after the per-layer phase (which comes on top)", one_of="budget")
    minutes: float | None = option(None, float, "wall-clock budget for both phases", one_of="budget")
    # relative: each tensor's step size is lr x its RMS (Adam steps are scale-free)
    lr: float = option(2e-3, float, "peak learning rate (cosine schedule), relative to each tensor's RMS")
    seq: int = option(256, int, "tokens per training window")
    batch: int = option(4, int, "windows per step")
    # Per-layer phase (off by default): match each attention's output on cached source activations.
    # At 1.5x and 5 CPU-minutes it bought less than the same time spent on KL steps (docs/quality.md).
    local_steps: int = option(0, int, "per-layer steps matching attention outputs before the KL phase (0: skip; "
                                      "60 is a sensible value)")
    local_share: float = 0.35  # with a minute budget, the most of it the per-layer phase may take
    local_tokens: int = 16384
    local_lr: float = 1e-2
    bf16: bool = True  # autocast the global phase to bfloat16 (fp32 master weights)
    text: str = option("wiki,news", str, "calibration texts, comma-separated")
    chat: float = option(0.5, float, "share of training windows from the source's own answers to healing prompts "
                                     "(0: text only, 1: chats only)")
    chat_prompts: int = option(120, int, "passage prompts besides the written instructions")
    answer_tokens: int = option(96, int, "longest source answer generated per prompt")
    # The source's outputs, computed once for a pool of windows instead of a teacher forward per step.
    # Off by default: a pool computed in the same heal cost held-out quality each time it was measured.
    teacher_windows: int = option(0, int, "training windows whose source outputs are computed once (kept in the "
                                          "cache folder) and reused, e.g. 512; 0: run the source on every step")
    teacher_top: int = 64  # the source's most likely tokens kept per position (the rest: one bucket)
    teacher_share: float = 0.25  # with a minute budget, the most of it computing the pool may take
    eval_text: str = "wiki"
    eval_tokens: int = 8192
    source: str | None = option(None, str, "source model", shown="the one recorded at conversion")
    seed: int = 0
    # The serving cache the model is healed for: "fp8" (e4m3, vLLM's unit scales) rounds the latent
    # keys and values in every training forward (gradients pass straight through the rounding).
    kv_cache_dtype: str = option("auto", str, "the cache the model will be served with: fp8 rounds the latent in "
                                              "training as vLLM's fp8 cache stores it (auto: no rounding)")


class Windows:
    """Random training windows from a text stream and a chat stream, mixed by `chat_share`."""

    def __init__(self, text: torch.Tensor, chats: torch.Tensor | None, chat_share: float) -> None:
        self.streams = [s for s in (text, chats) if s is not None]
        self.share = chat_share if chats is not None else 0.0

    def sample(self, count: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
        rows = []
        for _ in range(count):
            stream = self.streams[-1] if torch.rand((), generator=generator) < self.share else self.streams[0]
            start = int(torch.randint(0, stream.numel() - length, (), generator=generator))
            rows.append(stream[start: start + length])
        return torch.stack(rows)


def attention_params(module) -> list[torch.nn.Parameter]:
    """The Tucker factors healing trains in one attention module (latent maps and cores)."""
    return [p for name, p in module.named_parameters() if name.split(".")[0] in TRAINED]


def relative_adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam whose step size per tensor is lr times that tensor's RMS."""
    groups = [{"params": [p], "lr": lr * p.detach().square().mean().sqrt().item(), "base_lr": None} for p in params]
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.Adam(groups, betas=(0.9, 0.95))


def set_schedule(optimizer: torch.optim.Optimizer, progress: float, warmup: float = 0.03) -> None:
    """Linear warm-up then cosine decay, as a fraction of each group's base rate."""
    if progress < warmup:
        scale = progress / warmup
    else:
        scale = 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * scale


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student)."""
    t = F.log_softmax(teacher_logits.float(), -1).flatten(0, -2)
    s = F.log_softmax(student_logits.float(), -1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


@torch.no_grad()
def cache_attention_io(teacher, windows: torch.Tensor):
    """Per layer, the source attention's inputs and outputs on `windows`: lists of (n, T, d)."""
    layers = teacher.model.layers
    inputs, outputs = [[] for _ in layers], [[] for _ in layers]

    def hook(i):
        def grab(module, args, kwargs, out):
            inputs[i].append(kwargs["hidden_states"][0].clone())
            outputs[i].append(out[0][0].clone())
        return grab

    handles = [layer.self_attn.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for w in windows:
            teacher(w[None].to(teacher.device))
    finally:
        for h in handles:
            h.remove()
    return [torch.stack(x) for x in inputs], [torch.stack(y) for y in outputs]


def relative_error(attn, x, y, positions) -> float:
    with torch.no_grad():
        return ((attn(x, positions) - y).square().sum() / y.square().sum()).item()


def budget_used(step: int, steps: int | None, start: float, seconds: float | None) -> float:
    """How much of a budget of `steps` steps or `seconds` (whichever ends first) is spent, 0..1+."""
    by_steps = step / steps if steps else 0.0
    if seconds is None:
        return by_steps
    return max(by_steps, 1.0 if seconds <= 0 else (time.time() - start) / seconds)


def heal_layer(attn, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch: int = 4,
               seconds: float | None = None) -> tuple[float, float, int]:
    """Fit one attention to the source outputs y on inputs x for `steps` steps or `seconds`,
    whichever ends first; keep the result only if it helps."""
    positions = torch.arange(x.shape[1], device=x.device)
    before = relative_error(attn, x, y, positions)
    saved = {k: v.clone() for k, v in attn.state_dict().items()}
    params = attention_params(attn)
    optimizer = relative_adam(params, lr)
    start, step = time.time(), 0
    while (done := budget_used(step, steps, start, seconds)) < 1:
        set_schedule(optimizer, done)
        step += 1
        pick = torch.randint(0, x.shape[0], (batch,))
        loss = (attn(x[pick], positions) - y[pick]).square().sum() / y[pick].square().sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = relative_error(attn, x, y, positions)
    if after >= before:
        attn.load_state_dict(saved)
        after = before
    return before, after, step


def local_phase(student: TuckerLlama, teacher, windows: Windows, opt: HealOptions, deadline: float | None,
                progress: bool):
    """Per-layer fitting; with a deadline, the layers share out the time left until it."""
    x_all, y_all = cache_attention_io(teacher, windows.sample(opt.local_tokens // LOCAL_WINDOW, LOCAL_WINDOW))
    errors = []
    for i in tqdm(range(len(x_all)), desc="healing layers", unit="layer", disable=not progress):
        attn = student.model.layers[i].self_attn
        seconds = None if deadline is None else max(deadline - time.time(), 0.0) / (len(x_all) - i)
        errors.append(heal_layer(attn, x_all[i], y_all[i], opt.local_steps, opt.local_lr, seconds=seconds))
        x_all[i] = y_all[i] = None  # free as we go
    return [{"layer": i, "steps": n, "rel_error_before": round(b, 5), "rel_error_after": round(a, 5)}
            for i, (b, a, n) in enumerate(errors)]


def global_phase(student, teacher, windows: Windows, opt: HealOptions, deadline: float | None, progress: bool,
                 targets: TeacherTargets | None = None, ranks: Ranks = Ranks()):
    """KL steps until the budget ends: batches from the pool of `targets`, or fresh windows with a
    teacher forward each when there is none.

    Under torchrun every rank draws the same global batch of `opt.batch` windows and trains on its
    share of them; DistributedDataParallel (which starts every rank from rank 0's weights) averages
    the gradients, so a step is the single-process step on the global batch, up to float rounding."""
    order = torch.Generator().manual_seed(opt.seed + 1)
    params = [p for block in student.model.layers for p in attention_params(block.self_attn)]
    optimizer = relative_adam(params, opt.lr)
    on = next(student.parameters()).device
    model = student if ranks.world == 1 else torch.nn.parallel.DistributedDataParallel(student)
    mine = slice(ranks.rank, None, ranks.world)
    start, step, losses = time.time(), 0, []
    budget = (deadline - start) if deadline else None
    bar = tqdm(total=opt.steps if budget is None else int(max(budget, 0)), disable=not progress,
               desc="healing (KL)", unit="step" if budget is None else "s")
    student.train()
    while (done := ranks.agree(budget_used(step, opt.steps, start, budget))) < 1:
        set_schedule(optimizer, done)
        with torch.autocast(on.type, dtype=torch.bfloat16, enabled=opt.bf16):
            if targets is not None:
                batch, top_logp, top_ids = (t[mine].to(on) for t in targets.sample(opt.batch, order))
                loss = topk_kl(model(batch), top_logp, top_ids)
            else:
                batch = windows.sample(opt.batch, opt.seq, order)[mine].to(on)
                with torch.no_grad():
                    target = teacher(batch).logits
                loss = kl_loss(model(batch), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        losses.append(ranks.mean(loss))
        bar.update(1 if budget is None else int(time.time() - start) - bar.n)
        bar.set_postfix(kl=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    bar.close()
    student.eval()
    return step, losses


def heal(model_dir, out_dir, opt: HealOptions, progress: bool = True, device: str = "auto") -> dict:
    """Distil `model_dir` (a Tucker folder) against its source on `device` (tucker_serve.device);
    write the result to `out_dir`. Under torchrun, every process trains on its share of each batch
    (global_phase) and rank 0 computes the source's answers and outputs first, evaluates and writes;
    every rank returns the report."""
    with ranks_on(compute_device(device)) as (ranks, on):
        return _heal(model_dir, out_dir, opt, progress and ranks.main, on, ranks)


def _heal(model_dir, out_dir, opt: HealOptions, progress: bool, on: torch.device, ranks: Ranks) -> dict:
    if (opt.steps is None) == (opt.minutes is None):
        raise ModelError(f"give exactly one of {cite('steps', 'minutes')}")
    folder = resolve(str(model_dir))
    if not folder.is_tucker:
        raise ModelError(f"{model_dir} is not a Tucker folder: convert it first")
    report = json.loads((folder.folder / "tucker_report.json").read_text())
    source = resolve(opt.source or report["source"])
    torch.manual_seed(opt.seed)
    rounding = rounding_dtypes()  # auto: the latent as computed; an fp8 cache: rounded to its grid
    if opt.kv_cache_dtype != "auto" and opt.kv_cache_dtype not in rounding:
        raise ModelError(invalid("kv_cache_dtype", opt.kv_cache_dtype,
                                 f"is not a cache healing knows: {', '.join(['auto', *rounding])}"))
    if opt.batch % ranks.world:
        raise ModelError(invalid("batch", opt.batch, f"must be a multiple of the {ranks.world} processes"))
    student = TuckerLlama.from_pretrained(folder.folder, cache_dtype=rounding.get(opt.kv_cache_dtype)).to(on)
    for p in student.parameters():
        p.requires_grad_(False)
    for block in student.model.layers:
        for p in attention_params(block.self_attn):
            p.requires_grad_(True)
    teacher = load_source(source.folder, on)
    tokenizer = load_tokenizer(folder.folder)
    eval_windows = text_windows(tokenizer, load_text(opt.eval_text, "eval"), opt.eval_tokens, 1024) \
        if opt.eval_tokens and ranks.main else None  # 0: no perplexity check (a minute of the budget's time)
    lm = lambda ids: student(ids.to(on))  # noqa: E731
    before = perplexity(lm, eval_windows, progress=False) if eval_windows is not None else None
    tokens = torch.tensor([i for t in opt.text.split(",") for i in text_tokens(tokenizer, t.strip(), 400_000)])
    start = time.time()
    deadline = start + opt.minutes * 60 if opt.minutes is not None else None
    chats = None
    with ranks.main_first():  # the source's answers and outputs are kept in the cache folder
        if opt.chat > 0 and can_chat(tokenizer, source.folder.name, "healing on text only"):
            chats = source_chats(teacher, tokenizer, source.folder, opt.chat_prompts, opt.answer_tokens, progress)
        windows = Windows(tokens, chats, opt.chat)
        chat_minutes = (time.time() - start) / 60
        targets, reused = teacher_pool(teacher, windows, source.folder, opt, deadline, progress)
    if targets is not None and ranks.world > 1:  # rank 0's pool on every rank, even if a deadline cut it short
        n = int(ranks.agree(len(targets)))
        targets = TeacherTargets(targets.windows[:n], targets.ids[:n], targets.logp[:n])
    teacher_minutes = (time.time() - start) / 60 - chat_minutes
    local_deadline = None if deadline is None else time.time() + opt.local_share * (deadline - time.time())
    wanted = opt.local_steps > 0 and (deadline is None or opt.local_share > 0)
    local = local_phase(student, teacher, windows, opt, local_deadline, progress) if wanted else []
    local_minutes = (time.time() - start) / 60 - chat_minutes - teacher_minutes
    steps, losses = global_phase(student, teacher, windows, opt, deadline, progress, targets, ranks)
    del teacher
    release(on)
    minutes = (time.time() - start) / 60
    kl_minutes = max(minutes - local_minutes - chat_minutes - teacher_minutes, 1e-6)
    after = perplexity(lm, eval_windows, progress=False) if eval_windows is not None else None
    report["healing"] = {
        **healing_record(opt), "source": source.spec, "chat_answer_minutes": round(chat_minutes, 2),
        "chat_tokens": 0 if chats is None else chats.numel(), "local_minutes": round(local_minutes, 2),
        "teacher_minutes": round(teacher_minutes, 2), "teacher_pool": len(targets) if targets else 0,
        "teacher_pool_reused": reused,  # windows whose source outputs an earlier run had computed
        "teacher_passes": round(steps * opt.batch / len(targets), 2) if targets else None,
        "global_steps": steps,
        "minutes_done": round(minutes, 2), "tokens_trained": steps * opt.batch * opt.seq,
        "kl_minutes": round(kl_minutes, 2),  # the KL phase alone: its rate of steps and tokens
        "kl_steps_per_minute": round(steps / kl_minutes, 2),
        "kl_tokens_per_minute": round(steps * opt.batch * opt.seq / kl_minutes),
        "final_kl": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 5),
        "kl_per_step": [round(x, 6) for x in losses], "device": str(on), "processes": ranks.world,
        "perplexity_before": before and round(before.perplexity, 4),
        "perplexity_after": after and round(after.perplexity, 4),
        "eval_tokens": after and after.tokens, "trained": list(TRAINED), "layers": local,
    }
    if ranks.main:
        save_folder(student, folder.folder, Path(out_dir), report)
    return report


def healing_record(opt: HealOptions) -> dict:
    """The heal options a healed folder's report records (the source is recorded resolved, apart)."""
    return {k: v for k, v in options_record(opt).items() if k != "source"}


def teacher_pool(teacher, windows: Windows, source_folder: Path, opt: HealOptions, deadline: float | None,
                 progress: bool) -> tuple[TeacherTargets | None, int]:
    """The pool of training windows with the source's outputs (None with teacher_windows=0), and how
    many of them were read back from the cache folder. With steps, no more windows than the steps
    use; with minutes, computing stops at teacher_share of the budget."""
    if opt.teacher_windows <= 0:
        return None, 0
    count = opt.teacher_windows if opt.steps is None else min(opt.teacher_windows, opt.steps * opt.batch)
    # The pool's windows come from their own seeded generator: a longer pool extends a shorter one.
    pool = windows.sample(count, opt.seq, torch.Generator().manual_seed(opt.seed))
    key = {"text": opt.text, "chat": windows.share, "chat_prompts": opt.chat_prompts,
           "answer_tokens": opt.answer_tokens, "seq": opt.seq, "seed": opt.seed, "bf16": opt.bf16,
           "streams": [s.numel() for s in windows.streams]}
    stop = None if deadline is None else time.time() + opt.teacher_share * (deadline - time.time())
    return TeacherTargets.build(teacher, pool, opt.teacher_top, pool_path(source_folder, key), batch=opt.batch,
                                bf16=opt.bf16, deadline=stop, progress=progress)


def save_folder(model: TuckerLlama, src: Path, dest: Path, report: dict) -> None:
    """The healed weights, in the dtype of `src`, beside its config.json and tokenizer files."""
    config = read_config(src)
    dtype = getattr(torch, config.get("dtype", "float32"))
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    write_folder(dest, config, state, report, tokenizer_from=src)
