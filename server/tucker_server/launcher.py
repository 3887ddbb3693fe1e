"""`tucker-serve serve`: pick or build the model folder, start AsyncLLM, run uvicorn."""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from tucker_serve.paths import cache_dir
from tucker_serve.sources import ModelError, resolve

DEFAULT_SOURCE = "smollm2-135m"
DEFAULT_RATIO = 1.5


@dataclass(frozen=True)
class ServeOptions:
    model: str | None = None
    kv_ratio: float | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    metrics_need_key: bool = False
    max_model_len: int | None = 2048
    kv_cache_gb: float = 1.0
    dtype: str = "float32"
    max_num_seqs: int | None = None
    served_model_name: str | None = None
    log_level: str = "info"
    tensor_parallel_size: int = 1


def model_folder(opt: ServeOptions) -> tuple[Path, str]:
    """The folder to serve and its public name; converts (once, cached) when a ratio is asked for."""
    spec = opt.model or DEFAULT_SOURCE
    ratio = opt.kv_ratio if opt.kv_ratio is not None else (DEFAULT_RATIO if opt.model is None else None)
    source = resolve(spec)
    if source.is_tucker:
        if opt.kv_ratio is not None:
            raise ModelError(f"{spec} is already a Tucker checkpoint: drop --kv-ratio")
        return source.folder, opt.served_model_name or source.folder.name
    if ratio is None:
        return source.folder, opt.served_model_name or spec
    name = f"{source.folder.name}-tucker-{ratio:g}x"
    folder = cache_dir() / "models" / name
    if not (folder / "model.safetensors").is_file():
        from tucker_serve.convert import ConvertOptions, convert

        print(f"converting {spec} to Tucker attention at {ratio:g}x KV compression (once, cached in {folder})")
        convert(spec, folder, ConvertOptions(kv_ratio=ratio))
    default_name = f"{DEFAULT_SOURCE}-tucker" if opt.model is None and opt.kv_ratio is None else name
    return folder, opt.served_model_name or default_name


def run(opt: ServeOptions) -> int:
    import uvicorn

    from tucker_server.app import create_app
    from tucker_server.engine import EngineClient, EngineSettings
    from tucker_server.metrics import Metrics

    folder, name = model_folder(opt)
    metrics = Metrics()
    engine = EngineClient(EngineSettings(
        model=folder, served_name=name, max_model_len=opt.max_model_len, kv_cache_gb=opt.kv_cache_gb,
        dtype=opt.dtype, max_num_seqs=opt.max_num_seqs, tensor_parallel_size=opt.tensor_parallel_size), metrics)
    app = create_app(engine, metrics, opt.api_key, opt.metrics_need_key)
    logging.getLogger("tucker_server").info("serving %s (%s) on http://%s:%d", name, folder, opt.host, opt.port)
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, then re-raises the signal against the
    # handlers it found: make those end the process with status 0 after our engine shutdown.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        # no access log: the server never logs request bodies, and keeps request lines out by default
        uvicorn.run(app, host=opt.host, port=opt.port, log_level=opt.log_level, access_log=False,
                    timeout_graceful_shutdown=30)
    finally:
        engine.shutdown()
    return 0
