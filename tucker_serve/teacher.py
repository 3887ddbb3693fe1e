"""The source model's outputs on healing windows, computed once: top-k log-probs per position.

Healing's KL phase ran the source model (the teacher) on every training batch, about a quarter of
each step on CPU and a second model's memory on a device. Here a fixed pool of training windows is
drawn once; the teacher runs over it once and keeps, per position, its `top` most likely tokens
and their log-probs. Training then draws batches from the pool (a fresh shuffle per pass) and
needs no teacher forward. The pool is kept under the cache folder and grown on demand: a later
healing run of any conversion of the same source, on the same data, reads it back.

The loss against such targets (`topk_kl`) is the KL between the teacher's and the student's
distributions over the top-k tokens plus one bucket for the rest of the vocabulary: exact when k
is the vocabulary, otherwise a lower bound of the full KL (merging outcomes never increases it).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tucker_serve.paths import cache_dir

FORMAT = 1


def topk_kl(student_logits: torch.Tensor, top_logp: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top-k tokens and one tail bucket.

    student_logits (..., V); top_logp and top_ids (..., k): the teacher's log-probs of its k most
    likely tokens."""
    s = F.log_softmax(student_logits.float(), -1).gather(-1, top_ids.long())
    t = top_logp.float()
    eps = 1e-6
    t_tail = torch.log1p(-t.exp().sum(-1).clamp(max=1 - eps))
    s_tail = torch.log1p(-s.exp().sum(-1).clamp(max=1 - eps))
    kl = (t.exp() * (t - s)).sum(-1) + t_tail.exp() * (t_tail - s_tail)
    return kl.mean()


class TeacherTargets:
    """A pool of training windows with the teacher's top-k log-probs at every position.

    `windows` (n, T) int32, `ids` (n, T, k) int32, `logp` (n, T, k) float16."""

    def __init__(self, windows: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor) -> None:
        self.windows, self.ids, self.logp = windows, ids, logp
        self.order: list[int] = []

    def __len__(self) -> int:
        return self.windows.shape[0]

    @classmethod
    def build(cls, teacher, windows: torch.Tensor, top: int, path: Path | None = None, batch: int = 4,
              bf16: bool = True, deadline: float | None = None, progress: bool = True) -> tuple["TeacherTargets", int]:
        """The targets of `windows` (n, T): those already in `path` are read back (the stored
        windows must be their prefix), the rest computed by `teacher`, a batch at a time until
        `deadline` (time.time(); at least one batch), and `path` rewritten when it grew.
        Returns the targets (a prefix of `windows`) and how many windows were read back."""
        windows = windows.to(torch.int32)
        stored = torch.load(path) if path is not None and path.is_file() else None
        have, kept = 0, 0  # windows read back; windows the file holds that are still good
        ids, logp = [], []
        if stored is not None and stored["format"] == FORMAT and stored["top"] == top:
            have = min(len(windows), stored["windows"].shape[0])
            if torch.equal(stored["windows"][:have], windows[:have]):
                ids, logp, kept = [stored["ids"][:have]], [stored["logp"][:have]], stored["windows"].shape[0]
            else:
                have = 0  # other windows under the same key: recompute them
        done = have
        for start in tqdm(range(have, len(windows), batch), desc="teacher outputs", unit="batch",
                          disable=not progress or have >= len(windows)):
            if deadline is not None and done > 0 and time.time() > deadline:
                break
            chunk = windows[start: start + batch].long().to(next(teacher.parameters()).device)
            with torch.no_grad(), torch.autocast(chunk.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = teacher(chunk).logits
            values, index = F.log_softmax(out.float(), -1).topk(top, -1)
            ids.append(index.to("cpu", torch.int32))
            logp.append(values.to("cpu", torch.float16))
            done += len(chunk)
        targets = cls(windows[:done], torch.cat(ids), torch.cat(logp))
        if path is not None and done > kept:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"format": FORMAT, "top": top, "windows": targets.windows, "ids": targets.ids,
                        "logp": targets.logp}, tmp)
            tmp.replace(path)
        return targets, have

    def sample(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`count` windows (and their targets), passing over the whole pool in a fresh order each time."""
        picks = []
        while len(picks) < count:
            if not self.order:
                self.order = torch.randperm(len(self), generator=generator).tolist()
            picks.append(self.order.pop())
        pick = torch.tensor(picks)
        return self.windows[pick].long(), self.logp[pick], self.ids[pick]


def pool_path(source_folder: Path, key: dict) -> Path:
    """Where the pool of one source on one set of healing data is kept."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "teacher" / f"{Path(source_folder).name}-{digest}.pt"

