"""The vLLM plugin's settings without an engine: the CPU environment every engine we start gets, and
TUCKER_ATTENTION (which backend serves equal-width latents)."""

import pytest

from tucker_vllm import attention_mode, configure_cpu


@pytest.mark.parametrize("cores,ranks,expected", [(2, 1, "0-1"), (2, 2, "0-0|1-1"), (4, 2, "0-1|2-3"), (16, 1, None)])
def test_cpu_binding_shares_small_machines_between_ranks(monkeypatch, cores, ranks, expected):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    env = {"VLLM_CPU_KVCACHE_SPACE": "3"}
    configure_cpu(ranks, env)
    assert env.get("VLLM_CPU_OMP_THREADS_BIND") == expected
    assert "VLLM_CPU_KVCACHE_SPACE" not in env  # --kv-cache-memory-bytes must win


def test_serve_applies_the_cpu_settings(monkeypatch):
    from tucker_server.launcher import ServeOptions, plugin_environment

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    env = {"VLLM_CPU_KVCACHE_SPACE": "3"}
    plugin_environment(ServeOptions(tensor_parallel_size=2), env)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-0|1-1" and "VLLM_CPU_KVCACHE_SPACE" not in env


def test_attention_mode_is_auto_unless_set_and_refuses_unknown_values():
    assert attention_mode({}) == "auto"
    assert attention_mode({"TUCKER_ATTENTION": "tucker"}) == "tucker"
    with pytest.raises(ValueError, match="TUCKER_ATTENTION='tuckre' must be one of auto, tucker"):
        attention_mode({"TUCKER_ATTENTION": "tuckre"})


@pytest.mark.vllm
def test_forcing_tucker_puts_equal_width_latents_on_the_tucker_backend(monkeypatch):
    from vllm.config import VllmConfig, set_current_vllm_config

    from tucker_vllm.backend import TuckerAttentionBackend as Tucker, TuckerSharedLatentBackend as Shared
    from tucker_vllm.model import latent_backend

    with set_current_vllm_config(VllmConfig()):
        assert latent_backend(64, 64, False, "auto") is None  # vLLM's own CPU backend takes head size 64
        assert latent_backend(64, 32, False, "auto") is Tucker and latent_backend(64, 64, True, "auto") is Shared
        monkeypatch.setenv("TUCKER_ATTENTION", "tucker")
        assert latent_backend(64, 64, False, "auto") is Tucker


@pytest.mark.vllm
def test_the_equal_width_allocation_offers_the_head_sizes_vllms_cpu_kernel_takes():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from tucker_serve.allocate import VLLM_CPU_HEAD_SIZES

    assert sorted(VLLM_CPU_HEAD_SIZES) == sorted(CPUAttentionBackend.get_supported_head_sizes())
