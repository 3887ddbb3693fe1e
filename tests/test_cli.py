"""The console script: subcommands listed, the memory table computed by the formula module."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tucker_cli import main

SCRIPT = shutil.which("tucker-serve", path=str(Path(sys.executable).parent))


def test_console_script_lists_subcommands():
    out = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("memory", "serve"):
        assert command in out


def test_memory_table_reports_width_bytes_and_capacity(capsys):
    rc = main(["memory", "--layers", "30", "--dtype", "float32", "--budget-gb", "1",
               "--context", "2048", "--scheme", "gqa:3,64", "--scheme", "tucker:96,96"])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rc == 0
    assert rows["gqa:3,64"][:3] == ["384", "46,080", "23,296"]
    assert rows["tucker:96,96"][:3] == ["192", "23,040", "46,592"]


def test_bad_scheme_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["memory", "--layers", "2", "--scheme", "gqa:3"])
    assert exc.value.code == 2
    assert "bad scheme 'gqa:3'" in capsys.readouterr().err
