"""vLLM plugin: the TuckerLlamaForCausalLM model and the TUCKER attention backend.

`register` is the `vllm.general_plugins` entry point; vLLM calls it in every process it starts,
so it only adds what is not registered yet.
"""

from tucker_serve.checkpoint import ARCHITECTURE

BACKENDS = {"TUCKER": "TuckerAttentionBackend", "TUCKER_SHARED": "TuckerSharedLatentBackend"}


def register() -> None:
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    for name, cls in BACKENDS.items():
        if name not in AttentionBackendEnum.__members__:
            AttentionBackendEnum.register(name, f"tucker_vllm.backend.{cls}")
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "tucker_vllm.model:TuckerLlamaForCausalLM")
