"""Shared fixtures: the real SmolLM2-135M (materialized once per machine) and its conversions.

Conversions are made once per test session into a temporary folder and shared by every module
that needs them (the quality tests, the vLLM parity tests, the server tests).
"""

import contextlib
import os
import shutil
import tempfile

import pytest

from tucker_bench.serving import free_port, serve_command, server_process

_RUN_DIR = tempfile.mkdtemp(prefix="tucker-test-")


def pytest_configure(config):
    # vLLM and torch.compile write caches, sockets and temp files: keep them inside the test run.
    for var, sub in (("VLLM_CACHE_ROOT", "vllm-cache"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TMPDIR", "tmp")):
        os.environ[var] = os.path.join(_RUN_DIR, sub)
        os.makedirs(os.environ[var], exist_ok=True)


def pytest_unconfigure(config):
    shutil.rmtree(_RUN_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2():
    """The source model folder (dequantized GGUF, cached under the user cache folder)."""
    from tucker_serve.sources import resolve

    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def converted(smollm2, tmp_path_factory):
    """converted(kind) -> folder: 'full' (exact), a ratio such as 2.0 or a benchmark row's spec such as
    '1.2@measured' (model_cache.at_spec), made once per session. The full-rank conversion is exact at any
    calibration window: it calibrates on 512-token ones (30 s less)."""
    from tucker_serve.model_cache import at_spec, tucker_model

    root = tmp_path_factory.mktemp("tucker")
    return lambda kind: tucker_model("smollm2-135m", at_spec("full+calib_window=512" if kind == "full" else str(kind)),
                                     root=root, progress=False)


@pytest.fixture(scope="module")
def start_llm():
    """start_llm(**engine_args) -> vllm.LLM; every engine started is shut down with the module."""
    from vllm import LLM

    engines = []

    def start(**kwargs):
        engines.append(LLM(**kwargs))
        return engines[-1]

    yield start
    for llm in engines:
        llm.llm_engine.engine_core.shutdown()


@contextlib.contextmanager
def serve_process(folder, log_path, *args, env=None):
    """A real `tucker-serve serve` on a free loopback port, healthy; stopped (or killed) on exit.
    Yields {"port", "url", "proc", "log", "folder"}."""
    port = free_port()
    cmd = serve_command(folder, port, "--enforce-eager", *args)  # tests skip the start-up compile
    with server_process(cmd, port, log_path, env=env) as running:
        yield {**running, "folder": folder}
