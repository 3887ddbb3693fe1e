"""OpenAI routes: completions and chat completions (plain and SSE), models, memory, health, metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tucker_server.generation import Choice, Job, plan_chat, plan_completion, run_jobs, stream_jobs
from tucker_server.protocol import ChatRequest, CompletionRequest, error_body, new_id, now

router = APIRouter()


class APIError(Exception):
    """An error answered in OpenAI's shape with its status code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


def state(request: Request):
    return request.app.state


def check_model(request: Request, model: str) -> None:
    if model != state(request).engine.settings.served_name:
        raise APIError(404, f"The model `{model}` does not exist", "model", "model_not_found")


@router.get("/health")
async def health(request: Request) -> Response:
    ok = await state(request).engine.healthy()
    return JSONResponse({"status": "ok" if ok else "unhealthy"}, status_code=200 if ok else 503)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    name = state(request).engine.settings.served_name
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": state(request).started, "owned_by": "tucker-serve",
         "max_model_len": state(request).engine.max_model_len}]}


@router.get("/v1/models/{model:path}")
async def model(request: Request, model: str) -> dict:
    check_model(request, model)
    return (await models(request))["data"][0]


@router.get("/v1/memory")
async def memory(request: Request) -> dict:
    return state(request).engine.memory(state(request).metrics.last_usage)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    check_model(request, body.model)
    jobs = plan_completion(state(request).engine, body)
    return await respond(request, jobs, body, "text_completion", "cmpl")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request) -> Response:
    check_model(request, body.model)
    jobs = plan_chat(state(request).engine, body)
    return await respond(request, jobs, body, "chat.completion", "chatcmpl")


async def respond(request: Request, jobs: list[Job], body, kind: str, prefix: str) -> Response:
    engine, rid, created = state(request).engine, new_id(prefix), now()
    head = {"id": rid, "created": created, "model": body.model}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = stream_jobs(engine, jobs, rid, head, kind, include_usage)
        return StreamingResponse(sse(events, state(request).metrics), media_type="text/event-stream")
    task = asyncio.create_task(run_jobs(engine, jobs, rid))
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if not done and await request.is_disconnected():
                task.cancel()  # closing the generators aborts the requests in the engine
                state(request).metrics.disconnects.inc()
                return Response(status_code=499)
        choices: list[Choice] = task.result()
    finally:
        if not task.done():
            task.cancel()
    usage = usage_of(jobs, choices)
    return JSONResponse({**head, "object": kind, "choices": [c.body(kind) for c in choices], "usage": usage})


def usage_of(jobs: list[Job], choices: list[Choice]) -> dict:
    prompt = sum(len(j.prompt_ids) for j in jobs)
    completion = sum(c.num_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def sse(events: AsyncIterator[dict], metrics) -> AsyncIterator[str]:
    finished = False
    try:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away mid-stream: stream_jobs' cleanup aborted the requests
            metrics.disconnects.inc()
        await events.aclose()
