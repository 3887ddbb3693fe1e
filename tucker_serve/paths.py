"""Where tucker-serve keeps what it derives at set-up or first use (models, text)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """$TUCKER_SERVE_CACHE, else $XDG_CACHE_HOME/tucker-serve, else ~/.cache/tucker-serve."""
    if os.environ.get("TUCKER_SERVE_CACHE"):
        return Path(os.environ["TUCKER_SERVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tucker-serve"


@contextmanager
def atomic_dir(dest: Path):
    """Yield a temporary folder beside `dest`; rename it to `dest` only if the block succeeds.

    A failure (or an interrupt) removes the temporary folder, so no half-written output remains.
    An existing `dest` is replaced.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
