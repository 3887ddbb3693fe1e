"""The console script: subcommands listed, the memory table computed by the formula module."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tucker_cli import build_parser, main

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


def test_job_options_come_from_their_dataclasses():
    from tucker_bench import BenchOptions
    from tucker_serve.convert import ConvertOptions
    from tucker_serve.evaluate import EvalOptions
    from tucker_serve.heal import HealOptions
    from tucker_serve.options import given_options, options_from

    parse = build_parser().parse_args
    assert options_from(parse(["convert", "--out", "o", "--kv-ratio", "2"]), ConvertOptions) == \
        ConvertOptions(kv_ratio=2.0)
    assert options_from(parse(["heal", "--model", "m", "--out", "o", "--steps", "3"]), HealOptions) == \
        HealOptions(steps=3)
    assert options_from(parse(["eval", "--chat"]), EvalOptions) == EvalOptions(chat=True)
    bench = parse(["bench", "--out", "b", "--no-chat", "--compile", "--kv-ratios", "", "--contexts", "64,128"])
    assert given_options(bench, BenchOptions) == {"out": Path("b"), "chat": False, "eager": False, "kv_ratios": (),
                                                  "contexts": (64, 128)}
    assert options_from(parse(["bench", "--out", "b"]), BenchOptions) == BenchOptions(out=Path("b"))


@pytest.mark.parametrize("command", ["convert", "heal", "eval", "bench", "serve"])
def test_every_option_help_shows_its_default(command):
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub.declare()._actions:  # declared options are added on first use
        if action.help and not action.required and action.dest not in ("help", "model", "out", "json", "quiet",
                                                                        "quick", "kv_ratio", "full_rank", "key_rank",
                                                                        "steps", "minutes"):
            assert "default" in action.help, (command, action.dest)
