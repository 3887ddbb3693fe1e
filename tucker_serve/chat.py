"""Chat fidelity, the parts that need only torch: chat prompts (evaluation and healing sets, disjoint),
the source model's own greedy answers (transformers' generate, for healing), answer correctness on
the question set, and teacher-forced agreement and KL of a converted model on the source's answers.

Evaluation generates through vLLM, as the model is served (`tucker_eval.chat`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tucker_serve.checkpoint import ModelError
from tucker_serve.paths import cache_dir
from tucker_serve.prompts import INSTRUCTIONS, PASSAGE_TEMPLATES, QUESTIONS
from tucker_serve.text import load_text


def chat_template_or_error(tokenizer, what: str) -> None:
    """A ModelError naming `what` when the tokenizer has no chat template (most base models)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{what} needs a chat template, and this model's tokenizer has none (a base model?)")


def can_chat(tokenizer, model: str, otherwise: str) -> bool:
    """Whether the tokenizer has a chat template; without one (most base models), one line on stderr
    says what happens `otherwise`."""
    if getattr(tokenizer, "chat_template", None):
        return True
    print(f"note: {model} has no chat template (a base model?): {otherwise}", file=sys.stderr, flush=True)
    return False


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a one-turn chat with the model's chat template, ready for the answer."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids  # as vLLM's chat endpoint tokenizes it


def passages(split: str, count: int, words: int = 90) -> list[str]:
    """`count` paragraphs of 40+ words, half from the wiki and half from the news text of `split`,
    each cut to `words` words."""
    found = []
    for corpus, n in (("wiki", count // 2), ("news", count - count // 2)):
        paragraphs = [p.split() for p in load_text(corpus, split).split("\n")]
        found += [" ".join(w[:words]) for w in paragraphs if len(w) >= 40][:n]
    return found


def templated(split: str, count: int) -> list[str]:
    return [PASSAGE_TEMPLATES[i % len(PASSAGE_TEMPLATES)].format(passage=p) for i, p in enumerate(passages(split, count))]


def eval_prompts(passage_prompts: int = 24) -> list[str]:
    """The question set, then instructions over evaluation-split passages (never seen by healing)."""
    return [q for q, _ in QUESTIONS] + templated("eval", passage_prompts)


def heal_prompts(passage_prompts: int = 200) -> list[str]:
    """Instructions and instructions over calibration-split passages (disjoint from `eval_prompts`)."""
    return list(INSTRUCTIONS) + templated("calib", passage_prompts)


def correct(answers: list[str]) -> list[bool]:
    """Whether each answer to QUESTIONS (in order) matches its expected pattern."""
    return [re.search(pattern, answer, re.IGNORECASE) is not None for (_, pattern), answer in zip(QUESTIONS, answers)]


def strip_answer(ids: list[int], eos: set[int], pad: int | None) -> list[int]:
    """Generated ids up to and including the first end-of-turn token, without padding."""
    out = []
    for t in ids:
        if t == pad and t not in eos:
            break
        out.append(t)
        if t in eos:
            break
    return out


@torch.no_grad()
def greedy_answers(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch: int = 16,
                   progress: bool = True) -> list[list[int]]:
    """Greedy answers of a transformers model to tokenized prompts (left-padded batches)."""
    configured = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    answers = []
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # similar lengths together
    for start in tqdm(range(0, len(order), batch), desc="source answers", unit="batch", disable=not progress):
        group = [prompt_ids[i] for i in order[start: start + batch]]
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=sorted(eos))
        answers += [strip_answer(row[width:].tolist(), eos, pad) for row in out]
    result = [None] * len(prompt_ids)
    for i, answer in zip(order, answers):
        result[i] = answer
    return result


@torch.no_grad()
def teacher_forced(student, teacher, sequences: list[tuple[list[int], list[int]]], batch: int = 8,
                   progress: bool = True) -> dict:
    """Top-1 agreement and KL(teacher || student) on the answer tokens of (prompt, answer) pairs.

    `student` and `teacher` map input ids (B, T) to logits (B, T, vocab). Batches are right-padded:
    with causal attention, padding after a sequence changes nothing before it.
    """
    agree, kl, count = 0, 0.0, 0
    chunks = [sequences[i: i + batch] for i in range(0, len(sequences), batch)]
    for chunk in tqdm(chunks, desc="teacher forcing", unit="batch", disable=not progress):
        rows = [p + a for p, a in chunk]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        s_logp = F.log_softmax(student(ids).float(), -1)
        t_logp = F.log_softmax(teacher(ids).float(), -1).to(s_logp.device)
        for b, (prompt, answer) in enumerate(chunk):
            if not answer:
                continue
            # positions predicting the answer
            pos = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1, device=s_logp.device)
            targets = torch.tensor(answer, device=s_logp.device)
            agree += int((s_logp[b, pos].argmax(-1) == targets).sum())
            kl += float((t_logp[b, pos].exp() * (t_logp[b, pos] - s_logp[b, pos])).sum())
            count += len(answer)
    return {"agreement": agree / max(count, 1), "kl": kl / max(count, 1), "answer_tokens": count}


def source_chats(model, tokenizer, folder: Path, passage_prompts: int = 120, answer_tokens: int = 96,
                 min_tokens: int | None = None, progress: bool = True) -> torch.Tensor:
    """Healing prompts with the source model's own greedy answers, chat-templated and packed end to
    end in a fixed shuffled order: calibration and distillation data. With `min_tokens`, only as
    many prompts (in chunks) as that many tokens need. Each answer is generated once per source
    model and answer length, then read from the cache folder."""
    prompts = [chat_ids(tokenizer, p) for p in heal_prompts(passage_prompts)]
    random.Random(0).shuffle(prompts)
    cache = AnswerCache.of(folder, f"answers-{answer_tokens}")
    stream: list[int] = []
    for start in range(0, len(prompts), 64):
        chunk = prompts[start: start + 64]
        missing = [p for p in chunk if cache.get(p) is None]
        if missing:
            cache.put(missing, greedy_answers(model, tokenizer, missing, answer_tokens, batch=64, progress=progress))
        stream += [t for p in chunk for t in p + cache.get(p)]
        if min_tokens is not None and len(stream) >= min_tokens:
            break
    return torch.tensor(stream)


class AnswerCache:
    """Answers by prompt, in one JSON file written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.answers = json.loads(path.read_text()) if path.is_file() else {}

    @classmethod
    def of(cls, folder, kind: str) -> "AnswerCache":
        """The cache of one model folder's answers of one kind; two folders of one name stay apart."""
        where = hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()[:8]
        return cls(cache_dir() / "chat" / f"{Path(folder).name}-{where}-{kind}.json")

    @staticmethod
    def key(prompt: list[int]) -> str:
        return hashlib.sha1(json.dumps(prompt).encode()).hexdigest()

    def get(self, prompt: list[int]) -> list[int] | None:
        return self.answers.get(self.key(prompt))

    def put(self, prompts: list[list[int]], answers: list[list[int]]) -> None:
        self.answers.update({self.key(p): a for p, a in zip(prompts, answers)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.answers))
        tmp.replace(self.path)
