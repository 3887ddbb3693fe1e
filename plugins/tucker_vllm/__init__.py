"""vLLM plugin: the TuckerLlamaForCausalLM model and the TUCKER attention backend.

`register` is the `vllm.general_plugins` entry point; vLLM calls it in every process it starts,
so it only adds what is not registered yet. `configure_cpu` is the environment every engine we
start on a CPU gets (`tucker-serve serve`, evaluation and benchmarks), set before vLLM reads it.
`attention_mode` reads the plugin's one setting, TUCKER_ATTENTION.
"""

import os

from tucker_serve.checkpoint import ARCHITECTURE

BACKENDS = {"TUCKER": "TuckerAttentionBackend", "TUCKER_SHARED": "TuckerSharedLatentBackend"}
# TUCKER_ATTENTION: "auto" (equal-width latents on the backend vLLM selects, the rest on TUCKER) or
# "tucker" (the TUCKER backend on every layer, for comparisons). Read in every vLLM process.
ATTENTION_ENV, ATTENTION_MODES = "TUCKER_ATTENTION", ("auto", "tucker")


def attention_mode(environ=os.environ) -> str:
    """TUCKER_ATTENTION's value (default auto); anything else is refused by name, not ignored."""
    mode = environ.get(ATTENTION_ENV, "auto")
    if mode not in ATTENTION_MODES:
        raise ValueError(f"{ATTENTION_ENV}={mode!r} must be one of {', '.join(ATTENTION_MODES)}")
    return mode


def register() -> None:
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    for name, cls in BACKENDS.items():
        if name not in AttentionBackendEnum.__members__:
            AttentionBackendEnum.register(name, f"tucker_vllm.backend.{cls}")
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "tucker_vllm.model:TuckerLlamaForCausalLM")


def configure_cpu(ranks: int, environ=os.environ) -> None:
    """vLLM CPU settings: the cache size comes from --kv-cache-memory-bytes (VLLM_CPU_KVCACHE_SPACE
    would override it in whole GiB); on small machines the ranks share out every core (vLLM's
    automatic binding keeps one core per rank for its scheduler and wants a NUMA node per rank)."""
    environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    cores = os.cpu_count() or 1
    if ranks <= cores <= 4:
        per = cores // ranks
        environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(f"{r * per}-{(r + 1) * per - 1}" for r in range(ranks)))
