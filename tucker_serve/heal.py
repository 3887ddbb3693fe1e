"""Healing: distil the source model into a converted one, training only the attention factors.

The loss is KL(source || Tucker) over the full vocabulary at every position of random windows of
calibration text (never the evaluation split). Everything but the Tucker attention maps stays frozen.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tucker_serve.evaluate import perplexity, text_windows
from tucker_serve.model import TuckerLlama
from tucker_serve.paths import atomic_dir
from tucker_serve.sources import TOKENIZER_FILES, ModelError, load_hf_model, load_tokenizer, resolve
from tucker_serve.text import load_text

TRAINED = ("q_core", "k_latent", "v_latent", "o_core")


@dataclass(frozen=True)
class HealOptions:
    steps: int | None = None
    minutes: float | None = None
    lr: float = 3e-4
    seq: int = 256
    batch: int = 4
    text: str = "wiki,news"  # calibration splits, comma-separated
    eval_text: str = "wiki"
    eval_tokens: int = 8192
    source: str | None = None  # default: the `source` recorded in tucker_report.json
    seed: int = 0


def training_tokens(tokenizer, texts: str, count: int) -> torch.Tensor:
    """Token ids of the calibration splits, interleaved per corpus so every domain is sampled."""
    parts = [tokenizer(load_text(t.strip(), "calib")[: count * 12], add_special_tokens=False).input_ids[:count]
             for t in texts.split(",")]
    return torch.tensor([i for part in parts for i in part])


def trainable(model: TuckerLlama) -> list[torch.nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(f".self_attn.{t}" in name for t in TRAINED))
        if p.requires_grad:
            params.append(p)
    return params


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student)."""
    t = F.log_softmax(teacher_logits.float(), -1).flatten(0, -2)
    s = F.log_softmax(student_logits.float(), -1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def cosine_lr(base: float, progress: float, warmup: float = 0.03) -> float:
    if progress < warmup:
        return base * (progress / warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def heal(model_dir, out_dir, opt: HealOptions, progress: bool = True) -> dict:
    """Distil `model_dir` (a Tucker folder) against its source; write the result to `out_dir`."""
    if (opt.steps is None) == (opt.minutes is None):
        raise ModelError("give exactly one of --steps or --minutes")
    folder = resolve(str(model_dir))
    if not folder.is_tucker:
        raise ModelError(f"{model_dir} is not a Tucker folder: convert it first")
    report = json.loads((folder.folder / "tucker_report.json").read_text())
    source = resolve(opt.source or report["source"])
    torch.manual_seed(opt.seed)
    student = TuckerLlama.from_pretrained(folder.folder)
    teacher = load_hf_model(source.folder)
    tokenizer = load_tokenizer(folder.folder)
    windows = text_windows(tokenizer, load_text(opt.eval_text, "eval"), opt.eval_tokens, 1024)
    before = perplexity(student, windows, progress=False)
    params = trainable(student)
    optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=0.0, betas=(0.9, 0.95))
    tokens = training_tokens(tokenizer, opt.text, 400_000)
    start, step, losses = time.time(), 0, []
    budget = opt.steps if opt.steps is not None else opt.minutes * 60
    bar = tqdm(total=budget if opt.steps else int(budget), desc="healing", disable=not progress,
               unit="step" if opt.steps else "s")
    student.train()
    while True:
        done = step / opt.steps if opt.steps else (time.time() - start) / budget
        if done >= 1:
            break
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(opt.lr, done)
        starts = torch.randint(0, tokens.numel() - opt.seq, (opt.batch,))
        batch = torch.stack([tokens[s: s + opt.seq] for s in starts.tolist()])
        with torch.no_grad():
            target = teacher(batch).logits
        loss = kl_loss(student(batch), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        bar.update(1 if opt.steps else int(time.time() - start) - bar.n)
        bar.set_postfix(kl=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    bar.close()
    student.eval()
    minutes = (time.time() - start) / 60
    after = perplexity(student, windows, progress=False)
    report["healing"] = {
        **{k: v for k, v in asdict(opt).items() if k not in ("source",)},
        "source": source.spec, "steps_done": step, "minutes_done": round(minutes, 2),
        "tokens_trained": step * opt.batch * opt.seq, "final_kl": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 5),
        "perplexity_before": round(before.perplexity, 4), "perplexity_after": round(after.perplexity, 4),
        "eval_tokens": after.tokens, "eval_text": opt.eval_text, "trained": list(TRAINED),
    }
    save_folder(student, folder.folder, Path(out_dir), report)
    return report


def save_folder(model: TuckerLlama, src: Path, dest: Path, report: dict) -> None:
    from safetensors.torch import save_file

    dtype = json.loads((src / "config.json").read_text()).get("dtype", "float32")
    state = {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    with atomic_dir(dest) as tmp:
        for name in ("config.json", *TOKENIZER_FILES):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "tucker_report.json").write_text(json.dumps(report, indent=2))
