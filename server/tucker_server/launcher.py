"""`tucker-serve serve`: resolve or convert the model, then run vLLM's own OpenAI server with our plugins.

`ServeOptions` is the one declaration of serve's own options: their flags, TUCKER_<NAME>
environment variables, defaults and help all come from its fields. Every other argument goes to
vLLM's server parser unchanged (`vllm serve` semantics), after ours, so that it wins.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, replace
from pathlib import Path

from tucker_serve import options
from tucker_serve.cache_dtypes import served_names
from tucker_serve.checkpoint import ModelError
from tucker_serve.options import flag, option
from tucker_serve.sources import DEFAULT_MODEL, MODEL_HELP, resolve
from tucker_vllm import configure_cpu

DEFAULT_SOURCE = DEFAULT_MODEL
# The best model a first `make serve` can build within 10 minutes on 2 cores (docs/quality.md, "The
# default model"): 1.2x with latent widths per layer chosen by measurement on 512-token windows (a
# benchmark row's spec, model_cache.at_spec) keeps the source's chat answers and its pass keys at
# 1-4k tokens without healing; uniform 1.2x loses 7 of 48 pass keys, and 1.5x needs about 10
# minutes of healing. 1,024-token measurement windows cost 80 s more and did no better.
DEFAULT_CONVERSION = "1.2@measured+measure_window=512"
DEFAULT_HEAL_MINUTES = 0.0
MIDDLEWARE = "tucker_server.middleware.TuckerMiddleware"
PLUGIN = "tucker"  # the name of our entry points in every vLLM plugin group
ENV_PREFIX = "TUCKER_"
# What serve asks of vLLM on CPU unless told otherwise: vLLM's CPU backend neither sizes its cache from
# the machine's memory nor holds a model's whole context in it, and float32 is the CPU's reference
# dtype. On a GPU (any other platform) vLLM's own choices stand: the checkpoint's dtype, the cache that
# --gpu-memory-utilization leaves, the model's context (docs/deploy.md).
CPU_DEFAULTS = {"dtype": "float32", "kv_cache_gb": 1.0, "max_model_len": 2048}


@dataclass(frozen=True)
class ServeOptions:
    model: str | None = option(None, str, MODEL_HELP, shown=f"{DEFAULT_MODEL} converted at 1.2x, widths per layer by measurement (cached)")
    kv_ratio: float | None = option(None, float, "convert a source model at this KV compression first, uniform "
                                                 "widths as `tucker-serve convert --kv-ratio` (cached)")
    heal_minutes: float = option(DEFAULT_HEAL_MINUTES, float,
                                 "CPU-minutes of healing after a conversion (0: none); cached with the model")
    host: str = option("127.0.0.1", str, "address to listen on")
    port: int = option(8000, int, "port to listen on")
    api_key: str | None = option(None, str, "require 'Authorization: Bearer KEY' on every path but /health and "
                                            "/metrics; a blank key is refused", blank_is_value=True)
    no_api_key: bool = option(False, flag, "serve without a key on a non-loopback --host (every path open to "
                                           "anyone who reaches it); without a key only loopback hosts start")
    metrics_need_key: bool = option(False, flag, "put /metrics behind the key too")
    max_body_bytes: int = option(4 * 2**20, int, "largest request body; larger ones get 413")
    max_model_len: int | None = option(None, int, "context length in tokens", shown="2048 on CPU; elsewhere the model's own")
    kv_cache_gb: float | None = option(None, float, "KV-cache size in GiB",
                                       shown="1 on CPU; elsewhere what vLLM's --gpu-memory-utilization leaves")
    dtype: str | None = option(None, str, "weights and activations (auto: the checkpoint's dtype; vLLM serves a "
                                          "float32 checkpoint in bfloat16 on a GPU)",
                               choices=("auto", "float32", "bfloat16", "float16"),
                               shown="float32 on CPU; elsewhere auto")
    kv_cache_dtype: str = option("auto", str, "KV-cache element type (auto: the weights' dtype; fp8 halves a 16-bit "
                                              "cache and stacks with the Tucker latent)",
                                 choices=served_names())
    served_model_name: str | None = option(None, str, "the model id clients send")
    tensor_parallel_size: int = option(1, int, "GPUs (or CPU ranks) to shard the heads over")


def env_name(name: str) -> str:
    return options.env_var(name, ENV_PREFIX)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """serve's own flags; defaults stay None so that TUCKER_* variables can fill them."""
    options.add_arguments(parser, ServeOptions, env_prefix=ENV_PREFIX)


def options_from(args: argparse.Namespace, environ=os.environ) -> ServeOptions:
    """Flags first, then TUCKER_<NAME> variables, then the defaults."""
    return options.options_from(args, ServeOptions, environ, env_prefix=ENV_PREFIX)


def loopback(host: str) -> bool:
    """True for addresses only this machine can reach; names other than localhost count as open."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_host(opt: ServeOptions, passthrough: list[str]) -> str:
    """The address vLLM will bind: a --host passed through to vLLM wins over ours."""
    host = opt.host
    for i, arg in enumerate(passthrough):
        if arg == "--host" and i + 1 < len(passthrough):
            host = passthrough[i + 1]
        elif arg.startswith("--host="):
            host = arg.removeprefix("--host=")
    return host


def access(opt: ServeOptions, host: str) -> str:
    """Who may call the server, as a log line; ValueError for a configuration that would open it silently."""
    if opt.api_key is not None and not opt.api_key.strip():
        raise ValueError(f"--api-key / {env_name('api_key')} is empty: give a key, or --no-api-key to serve "
                         "without one")
    if opt.api_key is not None and opt.no_api_key:
        raise ValueError("--api-key and --no-api-key contradict each other: choose one")
    if opt.api_key is not None:
        return "API key required on every path but " + ("/health" if opt.metrics_need_key else "/health and /metrics")
    if opt.no_api_key:
        return f"no API key (--no-api-key): every path is open to anyone who reaches {host}"
    if not loopback(host):
        raise ValueError(f"--host {host!r} is reachable from other machines: set --api-key (or "
                         f"{env_name('api_key')}), or pass --no-api-key to serve without one")
    return f"no API key: open to clients on this machine only ({host})"


def model_folder(opt: ServeOptions) -> tuple[Path, str]:
    """The folder to serve and its public name; converts (once, cached) when a ratio is asked for."""
    spec = opt.model or DEFAULT_SOURCE
    source = resolve(spec)
    if source.is_tucker:
        if opt.kv_ratio is not None:
            raise ModelError(f"{spec} is already a Tucker checkpoint: drop --kv-ratio")
        return source.folder, opt.served_model_name or source.folder.name
    if opt.kv_ratio is None and opt.model is not None:
        return source.folder, opt.served_model_name or spec
    from tucker_serve.convert import ConvertOptions
    from tucker_serve.model_cache import at_spec, tucker_model

    convert = ConvertOptions(kv_ratio=opt.kv_ratio) if opt.kv_ratio is not None else at_spec(DEFAULT_CONVERSION)
    folder = tucker_model(spec, convert, opt.heal_minutes, apart=True)  # its GPU memory gone before vLLM starts
    default_name = f"{DEFAULT_SOURCE}-tucker" if opt.model is None and opt.kv_ratio is None else folder.name
    return folder, opt.served_model_name or default_name


def platform_name() -> str:
    """vLLM's platform on this machine: 'cpu', 'cuda', 'rocm', ..."""
    from vllm.platforms import current_platform

    return current_platform.device_type


def for_platform(opt: ServeOptions, platform: str) -> ServeOptions:
    """`opt` with the CPU sizes filled in where they were not given (on CPU only)."""
    if platform != "cpu":
        return opt
    return replace(opt, **{k: v for k, v in CPU_DEFAULTS.items() if getattr(opt, k) is None})


def vllm_arguments(opt: ServeOptions, folder: Path, name: str, platform: str) -> list[str]:
    """vLLM server arguments for our options on `platform` (pass-through arguments come after and win):
    the sizes not given are left to vLLM except on CPU (CPU_DEFAULTS). vLLM's compiled mode stays on
    everywhere (CUDA graphs on CUDA; on CPU it decodes faster after compiling once at the first start,
    docs/benchmarks.md); pass --enforce-eager to skip it."""
    opt = for_platform(opt, platform)
    sizes = {"--dtype": opt.dtype, "--max-model-len": opt.max_model_len,
             "--kv-cache-memory-bytes": None if opt.kv_cache_gb is None else int(opt.kv_cache_gb * 2**30)}
    return ["--model", str(folder), "--served-model-name", name, "--host", opt.host, "--port", str(opt.port),
            "--kv-cache-dtype", opt.kv_cache_dtype, *[a for k, v in sizes.items() if v is not None for a in (k, str(v))],
            "--tensor-parallel-size", str(opt.tensor_parallel_size),
            "--shutdown-timeout", "30", "--middleware", MIDDLEWARE]


def vllm_parser():
    """vLLM's own server argument parser, which reads what vllm_arguments builds."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="tucker-serve serve --", description="vLLM server options"))


def plugin_environment(opt: ServeOptions, environ=os.environ) -> None:
    """Enable our vLLM plugins and configure the middleware, before vLLM reads its environment."""
    named = [p for p in environ.get("VLLM_PLUGINS", "").split(",") if p]
    if named and PLUGIN not in named:
        environ["VLLM_PLUGINS"] = ",".join([*named, PLUGIN])
    elif not named:
        environ["VLLM_PLUGINS"] = PLUGIN  # endpoint plugins load only when named
    for name in ("api_key", "metrics_need_key", "max_body_bytes"):  # what the middleware reads
        value = getattr(opt, name)
        environ.pop(env_name(name), None)
        if value:
            environ[env_name(name)] = "1" if value is True else str(value)
    configure_cpu(opt.tensor_parallel_size, environ)


def run(opt: ServeOptions, passthrough: list[str]) -> int:
    """Serve until SIGTERM/SIGINT (in-flight requests drain for up to --shutdown-timeout seconds)."""
    who = access(opt, listen_host(opt, passthrough))  # before any conversion: a refused configuration fails at once
    folder, name = model_folder(opt)
    print(f"tucker-serve: {who}", flush=True)
    plugin_environment(opt)
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    args = vllm_parser().parse_args([*vllm_arguments(opt, folder, name, platform_name()), *passthrough])
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    ServeSubcommand.cmd(args)
    return 0
