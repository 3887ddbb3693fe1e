"""GET /v1/memory on vLLM's OpenAI server (entry point `vllm.endpoint_plugins`; vLLM loads it only
when VLLM_PLUGINS names `tucker`)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request

from tucker_server.kv_memory import USAGE, EngineMemory

router = APIRouter()


@router.get("/v1/memory")
async def memory(request: Request) -> dict:
    """Bytes per token, compression against the source model, capacity and usage of the KV cache."""
    # Usage is what the stat logger saw last (mean over engines); 0 when stats logging is off.
    usage = sum(USAGE.values()) / len(USAGE) if USAGE else 0.0
    return request.app.state.tucker_memory.document(usage)


class MemoryEndpoint:
    """The vLLM endpoint plugin serving /v1/memory."""

    name = "tucker"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        state.tucker_memory = EngineMemory.of(engine_client.vllm_config)
