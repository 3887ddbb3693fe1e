"""`tucker-serve serve` without an engine: its options, their TUCKER_* variables, the vLLM arguments
they become and the plugins it enables (its CPU settings: tests/test_plugin_settings.py)."""

import argparse

import pytest

from tucker_cli import build_parser
from tucker_server.launcher import (
    MIDDLEWARE, ServeOptions, add_arguments, model_folder, options_from, plugin_environment, vllm_arguments,
    vllm_parser,
)


def parse(*argv, environ=None):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return options_from(parser.parse_args(argv), environ or {})


def test_flags_win_over_environment_over_defaults():
    opt = parse("--kv-ratio", "2", environ={"TUCKER_KV_RATIO": "3", "TUCKER_PORT": "9000", "TUCKER_METRICS_NEED_KEY": "yes"})
    assert (opt.kv_ratio, opt.port, opt.metrics_need_key, opt.max_model_len) == (2.0, 9000, True, None)
    assert parse() == ServeOptions()
    assert parse("--max-model-len", "4096", environ={"TUCKER_KV_CACHE_GB": "8"}).kv_cache_gb == 8.0


@pytest.mark.parametrize("env,needle", [({"TUCKER_PORT": "eighty"}, "TUCKER_PORT='eighty' is not a valid int"),
                                        ({"TUCKER_DTYPE": "int8"}, "TUCKER_DTYPE='int8' must be one of")])
def test_bad_environment_values_name_the_variable(env, needle):
    with pytest.raises(ValueError, match=needle):
        parse(environ=env)


def test_vllm_arguments_carry_our_options_and_the_middleware(tmp_path):
    args = vllm_arguments(ServeOptions(kv_cache_gb=0.5, port=8123, dtype="bfloat16", kv_cache_dtype="fp8"),
                          tmp_path, "m", "cpu")
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--model"] == str(tmp_path) and pairs["--served-model-name"] == "m"
    assert pairs["--kv-cache-memory-bytes"] == str(2**29) and pairs["--port"] == "8123"
    assert pairs["--dtype"] == "bfloat16" and pairs["--kv-cache-dtype"] == "fp8"
    assert args[args.index("--middleware") + 1] == MIDDLEWARE
    assert "--shutdown-timeout" in args  # SIGTERM drains in-flight requests
    assert "--enforce-eager" not in args  # vLLM's compiled mode (CUDA graphs on CUDA), measured faster on CPU too


def vllm_args(args: list[str]):
    """What vLLM's own server parser makes of our arguments."""
    return vllm_parser().parse_args(args)


def test_sizes_not_given_are_cpu_defaults_on_cpu_and_vllms_own_on_a_gpu(tmp_path):
    from vllm.config import CacheConfig

    cpu = vllm_args(vllm_arguments(ServeOptions(), tmp_path, "m", "cpu"))
    assert (cpu.dtype, cpu.max_model_len, cpu.kv_cache_memory_bytes) == ("float32", 2048, 2**30)
    for platform in ("cuda", "rocm"):
        args = vllm_arguments(ServeOptions(), tmp_path, "m", platform)
        assert not {"--dtype", "--max-model-len", "--kv-cache-memory-bytes"} & set(args)
        gpu = vllm_args(args)  # vLLM's own: the checkpoint's dtype, its context, the memory-utilization share
        assert (gpu.dtype, gpu.max_model_len, gpu.kv_cache_memory_bytes) == ("auto", None, None)
        assert gpu.gpu_memory_utilization == CacheConfig().gpu_memory_utilization
    asked = vllm_args(vllm_arguments(ServeOptions(kv_cache_gb=8, max_model_len=8192, dtype="bfloat16"), tmp_path,
                                     "m", "cuda"))
    assert (asked.dtype, asked.max_model_len, asked.kv_cache_memory_bytes) == ("bfloat16", 8192, 8 * 2**30)
    assert vllm_args(vllm_arguments(ServeOptions(dtype="auto"), tmp_path, "m", "cpu")).dtype == "auto"


def test_unknown_serve_arguments_pass_through_to_vllm_in_order():
    from tucker_cli import split_passthrough

    args, passthrough = split_passthrough(build_parser(), ["serve", "--kv-ratio", "2", "--max-num-seqs", "64",
                                                           "--", "--enable-prefix-caching", "--port", "1"])
    assert args.kv_ratio == 2.0
    assert passthrough == ["--max-num-seqs", "64", "--enable-prefix-caching", "--port", "1"]
    with pytest.raises(SystemExit):
        split_passthrough(build_parser(), ["convert", "--bogus"])


def test_plugin_environment_names_our_plugins_and_keys_the_middleware():
    env = {"VLLM_PLUGINS": "other", "TUCKER_METRICS_NEED_KEY": "1"}
    plugin_environment(ServeOptions(api_key="k", max_body_bytes=1000), env)
    assert env["VLLM_PLUGINS"] == "other,tucker" and env["TUCKER_API_KEY"] == "k"
    assert env["TUCKER_MAX_BODY_BYTES"] == "1000"  # what the middleware reads back through ServeOptions
    assert "TUCKER_METRICS_NEED_KEY" not in env  # the option said no
    fresh = {}
    plugin_environment(ServeOptions(), fresh)
    assert fresh["VLLM_PLUGINS"] == "tucker" and "TUCKER_API_KEY" not in fresh


@pytest.mark.parametrize("env", [{"TUCKER_API_KEY": ""}, {"TUCKER_API_KEY": "  "}])
def test_a_blank_key_from_the_environment_is_refused_not_read_as_none(env):
    from tucker_server.launcher import access

    opt = parse(environ=env)
    assert opt.api_key == env["TUCKER_API_KEY"]
    with pytest.raises(ValueError, match="TUCKER_API_KEY is empty"):
        access(opt, "127.0.0.1")
    with pytest.raises(ValueError, match="is empty"):
        access(parse("--api-key", " "), "0.0.0.0")


def test_only_loopback_hosts_start_without_a_key_unless_asked():
    from tucker_server.launcher import access, listen_host

    assert "this machine only" in access(ServeOptions(), "127.0.0.1")
    assert "this machine only" in access(ServeOptions(host="::1"), "::1")
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "my-host"):
        with pytest.raises(ValueError, match="reachable from other machines"):
            access(ServeOptions(host=host), host)
    assert "open to anyone" in access(parse("--no-api-key", environ={"TUCKER_HOST": "0.0.0.0"}), "0.0.0.0")
    assert "API key required" in access(ServeOptions(api_key="k", host="0.0.0.0"), "0.0.0.0")
    with pytest.raises(ValueError, match="contradict"):
        access(ServeOptions(api_key="k", no_api_key=True), "127.0.0.1")
    # a --host passed through to vLLM is the one it binds: it is checked, not ours
    assert listen_host(ServeOptions(), ["--max-num-seqs", "4", "--host", "0.0.0.0"]) == "0.0.0.0"
    assert listen_host(ServeOptions(), ["--host=::"]) == "::"


def test_serve_refuses_an_open_public_host_before_building_anything(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tucker_cli", "serve", "--model", str(tmp_path / "missing"), "--",
                           "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "TUCKER_API_KEY": ""})
    assert proc.returncode == 2 and "TUCKER_API_KEY is empty" in proc.stderr


def test_serve_builds_a_missing_conversion_in_another_process(smollm2, tmp_path, monkeypatch):
    """On a GPU the build's CUDA context and cached memory must not stay in the process that then
    starts vLLM: serve builds a missing conversion in a spawned process (nothing is calibrated here),
    and finds a built one without starting any."""
    import multiprocessing

    import torch
    import transformers as tf

    from helpers import TINY_SOURCE, save_source
    from tucker_serve import calibrate

    monkeypatch.setenv("TUCKER_SERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibrate, "_kept", type(calibrate._kept)())
    torch.manual_seed(0)
    source = save_source(tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_SOURCE)), tmp_path / "tiny", smollm2.folder)
    opt = ServeOptions(model=str(source), kv_ratio=2.0)
    folder, _ = model_folder(opt)
    assert (folder / "model.safetensors").is_file() and folder.parent == tmp_path / "cache" / "models"
    assert not calibrate._kept  # the calibration ran in the other process
    monkeypatch.setattr(multiprocessing, "get_context", lambda *a: pytest.fail("started a process for a built model"))
    assert model_folder(opt)[0] == folder
