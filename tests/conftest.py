"""Shared fixtures: the real SmolLM2-135M (materialized once per machine) and its conversions.

Conversions are made once per test session into a temporary folder and shared by every module
that needs them (the quality tests, the vLLM parity tests, the server tests).
"""

import os
import shutil
import tempfile

import pytest

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
    """convert(kind) -> folder: 'full' (exact) or a ratio such as 2.0, made once per session."""
    from tucker_serve.convert import ConvertOptions, convert

    made = {}

    def get(kind):
        if kind not in made:
            out = tmp_path_factory.mktemp("tucker") / f"smollm2-{kind}"
            opt = ConvertOptions(full_rank=True) if kind == "full" else ConvertOptions(kv_ratio=float(kind))
            convert("smollm2-135m", out, opt, progress=False)
            made[kind] = out
        return made[kind]

    return get
