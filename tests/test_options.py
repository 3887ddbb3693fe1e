"""Declared options (tucker_serve.options): flags, help, environment variables and error messages
derived from one dataclass field per option."""

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from tucker_serve.options import (
    add_arguments, cite, flag, flag_of, given_options, invalid, listing, option, options_from,
)


@dataclass(frozen=True)
class Job:
    kv_ratio: float | None = option(None, float, "compression", one_of="size")
    full_rank: bool = option(False, flag, "no compression", one_of="size")
    calib_tokens: int = option(16384, int, "calibration tokens")
    dtype: str = option("float32", str, "weights", choices=("float32", "bfloat16"))
    ratios: tuple[float, ...] = option((1.2, 2.0), listing(float), "ratios to measure")
    models: tuple[str, ...] = option((), listing(str), "extra models")
    chat: bool = option(True, flag, "skip the chat columns", flag_name="--no-chat")
    key: str | None = option(None, str, "a key", blank_is_value=True)
    source: str | None = option(None, str, "source model", shown="the recorded one")
    out: Path = option(Path("runs/x"), Path, "output folder", required=True)
    window: int = 512  # a plain field: no flag


def parser_for(cls=Job, **kw) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="job")
    add_arguments(parser, cls, **kw)
    return parser


def parse(*argv, environ=None, env_prefix=None) -> Job:
    return options_from(parser_for(env_prefix=env_prefix).parse_args(argv), Job, environ, env_prefix)


def test_flags_come_from_field_names_and_plain_fields_have_none():
    flags = {s for a in parser_for()._actions for s in a.option_strings}
    assert {"--kv-ratio", "--full-rank", "--calib-tokens", "--dtype", "--ratios", "--models", "--no-chat",
            "--key", "--source", "--out"} <= flags
    assert "--window" not in flags and "--chat" not in flags
    assert flag_of("kv_cache_dtype") == "--kv-cache-dtype"


def test_unset_flags_take_the_dataclass_defaults():
    opt = parse("--full-rank", "--out", "o")
    assert opt == Job(full_rank=True, out=Path("o"))
    assert opt.calib_tokens == 16384 and opt.ratios == (1.2, 2.0) and opt.chat is True


def test_help_shows_each_default_from_the_field():
    text = " ".join(parser_for(env_prefix="JOB_").format_help().split())
    assert "calibration tokens (default 16384; env JOB_CALIB_TOKENS)" in text
    assert "ratios to measure (default 1.2,2;" in text and "extra models (default none;" in text
    assert "skip the chat columns (default chat=True;" in text
    assert "source model (default the recorded one;" in text
    assert "weights (default float32;" in text
    assert "output folder (env JOB_OUT)" in text  # required: no default to show
    assert "env" not in " ".join(parser_for().format_help().split()).split("options:")[1]


def test_a_negated_flag_sets_the_field_to_the_opposite_of_its_default():
    assert parse("--full-rank", "--out", "o", "--no-chat").chat is False


def test_listing_parses_comma_separated_values_and_blank_means_none():
    opt = parse("--full-rank", "--out", "o", "--ratios", "1, 2.5", "--models", "")
    assert opt.ratios == (1.0, 2.5) and opt.models == ()
    assert listing(str)("auto,fp8") == ("auto", "fp8")


def test_bad_values_and_choices_are_usage_errors(capsys):
    for argv in (["--ratios", "1,x"], ["--dtype", "int8"], ["--calib-tokens", "many"]):
        with pytest.raises(SystemExit):
            parse("--full-rank", "--out", "o", *argv)
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_one_of_group_takes_exactly_one_and_required_is_required():
    for argv in ([], ["--kv-ratio", "2", "--full-rank"]):
        with pytest.raises(SystemExit):
            parse("--out", "o", *argv)
    with pytest.raises(SystemExit):
        parse("--kv-ratio", "2")
    assert parse("--kv-ratio", "2", "--out", "o").kv_ratio == 2.0


def test_environment_fills_what_flags_leave_unset_only_with_a_prefix():
    env = {"JOB_CALIB_TOKENS": "99", "JOB_DTYPE": "bfloat16", "JOB_CHAT": "no", "JOB_RATIOS": "3,4"}
    opt = parse("--full-rank", "--out", "o", "--dtype", "float32", environ=env, env_prefix="JOB_")
    assert (opt.calib_tokens, opt.dtype, opt.chat, opt.ratios) == (99, "float32", False, (3.0, 4.0))
    assert parse("--full-rank", "--out", "o", environ=env) == Job(full_rank=True, out=Path("o"))


def test_blank_environment_values_are_unset_unless_blank_is_value():
    env = {"JOB_KEY": "", "JOB_SOURCE": "", "JOB_CALIB_TOKENS": ""}
    opt = parse("--full-rank", "--out", "o", environ=env, env_prefix="JOB_")
    assert opt.key == "" and opt.source is None and opt.calib_tokens == 16384


@pytest.mark.parametrize("env,needle", [({"JOB_CALIB_TOKENS": "many"}, "JOB_CALIB_TOKENS='many' is not a valid int"),
                                        ({"JOB_DTYPE": "int8"}, "JOB_DTYPE='int8' must be one of float32, bfloat16"),
                                        ({"JOB_CHAT": "maybe"}, "JOB_CHAT='maybe' is not a valid flag")])
def test_bad_environment_values_name_the_variable(env, needle):
    with pytest.raises(ValueError, match=needle):
        parse("--full-rank", "--out", "o", environ=env, env_prefix="JOB_")


def test_given_options_holds_only_what_was_set():
    args = parser_for().parse_args(["--kv-ratio", "2", "--out", "o", "--no-chat"])
    assert given_options(args, Job) == {"kv_ratio": 2.0, "out": Path("o"), "chat": False}


def test_messages_name_options_for_python_callers_and_cli_users():
    assert invalid("kv_ratio", 5.0, "must lie in [1, 4.5]") == "kv_ratio=5.0 must lie in [1, 4.5] (--kv-ratio)"
    assert cite("steps", "minutes") == "steps or minutes (--steps, --minutes)"
    assert cite("key_rank", "value_rank", conj="and") == "key_rank and value_rank (--key-rank, --value-rank)"
    assert cite("full_rank") == "full_rank (--full-rank)"
