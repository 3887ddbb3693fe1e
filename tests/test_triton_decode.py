"""Runs the Triton kernel cases (tests/triton_kernel_cases.py) under Triton's CPU interpreter.

They run in a fresh Python process: Triton decides at import time whether its own library
functions (tl.cdiv, ...) are interpreted, and earlier tests import Triton through vLLM with the
interpreter off.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("triton_kernel_cases.py")


def test_triton_kernel_cases_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                          cwd=CASES.parent.parent, env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert "12 passed" in proc.stdout and "skipped" not in proc.stdout, report
