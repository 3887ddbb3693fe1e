"""From OpenAI requests to engine requests and back: prompts, sampling, choices, SSE deltas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from tucker_server.protocol import ChatRequest, CompletionRequest


class RequestError(ValueError):
    """A request the model cannot serve (too long, bad token ids): answered with 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class Job:
    """One prompt sent to the engine, sampled n times; its choices start at `first_index`."""

    prompt_ids: list[int]
    params: SamplingParams
    first_index: int
    echo: str | None = None  # completions with echo: the prompt text, prepended to each choice


@dataclass
class Choice:
    index: int
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)  # per output token: (token_id, {id: Logprob})
    top: int | None = None  # logprobs asked for (None: no logprobs in the response)

    def body(self, kind: str) -> dict:
        if kind == "chat.completion":
            return {"index": self.index, "message": {"role": "assistant", "content": self.text},
                    "logprobs": chat_logprobs(self.logprobs, self.top) if self.top is not None else None,
                    "finish_reason": self.finish_reason}
        return {"index": self.index, "text": self.text, "finish_reason": self.finish_reason,
                "logprobs": completion_logprobs(self.logprobs, self.top, self.text) if self.top is not None else None}


def sampling(body, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None, kind) -> SamplingParams:
    try:
        return SamplingParams(
            n=body.n, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop,
            max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, output_kind=kind,
        )
    except ValueError as exc:  # vLLM's own checks (e.g. an empty stop string)
        raise RequestError(str(exc)) from None


def budget(engine, prompt_ids: list[int], max_tokens: int | None, param: str) -> int:
    """max_tokens, checked against the context; None means the rest of the context."""
    room = engine.max_model_len - len(prompt_ids)
    asked = room if max_tokens is None else max_tokens
    if room < 1 or asked > room:
        raise RequestError(
            f"This model's maximum context length is {engine.max_model_len} tokens. However, you requested "
            f"{len(prompt_ids) + asked} tokens ({len(prompt_ids)} in the prompt; {asked} for the completion). "
            "Please reduce the length of the prompt or the completion.",
            param, "context_length_exceeded")
    return asked


def prompt_token_lists(engine, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [engine.tokenizer(prompt).input_ids]
    if all(isinstance(p, int) for p in prompt):
        return [check_ids(engine, prompt)]
    return [engine.tokenizer(p).input_ids if isinstance(p, str) else check_ids(engine, p) for p in prompt]


def check_ids(engine, ids: list[int]) -> list[int]:
    vocab = len(engine.tokenizer)
    if not ids or min(ids) < 0 or max(ids) >= vocab:
        raise RequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
    return ids


def plan_completion(engine, body: CompletionRequest) -> list[Job]:
    jobs = []
    for i, ids in enumerate(prompt_token_lists(engine, body.prompt)):
        max_tokens = budget(engine, ids, body.max_tokens, "max_tokens")
        echo = engine.tokenizer.decode(ids) if body.echo else None
        prompt_lp = body.logprobs if body.echo and body.logprobs is not None else None
        params = sampling(body, max_tokens, body.logprobs, prompt_lp, output_kind(body))
        jobs.append(Job(ids, params, i * body.n, echo))
    return jobs


def plan_chat(engine, body: ChatRequest) -> list[Job]:
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    max_tokens = budget(engine, ids, body.max_completion_tokens or body.max_tokens, "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    return [Job(ids, sampling(body, max_tokens, top, None, output_kind(body)), 0)]


def output_kind(body) -> RequestOutputKind:
    return RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY


def top_of(job: Job) -> int | None:
    return job.params.logprobs


async def run_jobs(engine, jobs: list[Job], rid: str) -> list[Choice]:
    """Every job to completion, concurrently; choices in index order."""

    async def one(j: int, job: Job) -> list[Choice]:
        final = None
        async for out in engine.generate(job.prompt_ids, job.params, f"{rid}-{j}"):
            final = out
        choices = []
        for o in sorted(final.outputs, key=lambda o: o.index):
            c = Choice(job.first_index + o.index, o.text, len(o.token_ids), o.finish_reason, top=top_of(job))
            c.logprobs = list(zip(o.token_ids, o.logprobs or []))
            if job.echo is not None:
                c.text = job.echo + c.text
                if c.top is not None:
                    c.logprobs = echo_logprobs(job.prompt_ids, final.prompt_logprobs) + c.logprobs
            choices.append(c)
        return choices

    results = await asyncio.gather(*(one(j, job) for j, job in enumerate(jobs)))
    return sorted((c for cs in results for c in cs), key=lambda c: c.index)


def echo_logprobs(prompt_ids: list[int], prompt_logprobs) -> list:
    rows = prompt_logprobs or [None] * len(prompt_ids)
    return [(t, rows[i] or {}) for i, t in enumerate(prompt_ids)]


async def stream_jobs(engine, jobs: list[Job], rid: str, head: dict, kind: str,
                      include_usage: bool) -> AsyncIterator[dict]:
    """SSE events of every job, interleaved as the engine produces them; aborts on early exit."""
    chat = kind == "chat.completion"
    chunk = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    if include_usage:
        chunk["usage"] = None
    queue: asyncio.Queue = asyncio.Queue()
    generated = 0

    async def pump(j: int, job: Job) -> None:
        try:
            async for out in engine.generate(job.prompt_ids, job.params, f"{rid}-{j}"):
                await queue.put((job, out))
        finally:
            await queue.put((job, None))

    tasks = [asyncio.create_task(pump(j, job)) for j, job in enumerate(jobs)]
    started: set[int] = set()
    try:
        pending = len(tasks)
        while pending:
            job, out = await queue.get()
            if out is None:
                pending -= 1
                continue
            for o in out.outputs:
                index = job.first_index + o.index
                generated += len(o.token_ids)
                if chat:
                    if index not in started:
                        started.add(index)
                        yield {**chunk, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]}
                    delta = {"content": o.text} if o.text else {}
                    lp = chat_logprobs(list(zip(o.token_ids, o.logprobs or [])), top_of(job)) if top_of(job) is not None else None
                    choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": o.finish_reason}
                else:
                    text = o.text
                    if job.echo is not None and index not in started:
                        started.add(index)
                        text = job.echo + text
                    lp = completion_logprobs(list(zip(o.token_ids, o.logprobs or [])), top_of(job), o.text) if top_of(job) is not None else None
                    choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": o.finish_reason}
                yield {**chunk, "choices": [choice]}
        for t in tasks:
            t.result()  # surface engine errors
        if include_usage:
            prompt = sum(len(j.prompt_ids) for j in jobs)
            yield {**chunk, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": generated,
                                                     "total_tokens": prompt + generated}}
    finally:
        for t in tasks:
            t.cancel()
        for j in range(len(jobs)):
            await engine.abort(f"{rid}-{j}")


def token_text(lp, token_id: int) -> str:
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else f"<{token_id}>"


def completion_logprobs(rows: list, top: int, text: str) -> dict:
    """Legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for token_id, cands in rows:
        chosen = cands.get(token_id)
        tok = token_text(chosen, token_id)
        out["tokens"].append(tok)
        out["token_logprobs"].append(chosen.logprob if chosen is not None else None)
        ranked = sorted(cands.items(), key=lambda kv: kv[1].logprob, reverse=True)[:top]
        out["top_logprobs"].append({token_text(lp, t): lp.logprob for t, lp in ranked} if cands else None)
        out["text_offset"].append(offset)
        offset += len(tok)
    return out


def chat_logprobs(rows: list, top: int) -> dict:
    """Chat format: per token its text, logprob, UTF-8 bytes and the top alternatives."""
    content = []
    for token_id, cands in rows:
        chosen = cands.get(token_id)
        tok = token_text(chosen, token_id)
        ranked = sorted(cands.items(), key=lambda kv: kv[1].logprob, reverse=True)[:top]
        content.append({
            "token": tok, "logprob": chosen.logprob if chosen is not None else None, "bytes": list(tok.encode()),
            "top_logprobs": [{"token": token_text(lp, t), "logprob": lp.logprob,
                              "bytes": list(token_text(lp, t).encode())} for t, lp in ranked],
        })
    return {"content": content}
