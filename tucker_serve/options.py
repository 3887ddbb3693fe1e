"""Declared options: each option of a job is one dataclass field holding its default, kind, help and
choices (`option`); the command line (`add_arguments`), optional <PREFIX><NAME> environment variables
(`options_from`) and error messages (`flag_of`, `cite`, `invalid`) are derived from the field.

Standard library only: the core, the server and the CLI all read it.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import Field, asdict, field, fields


def flag(text: str) -> bool:
    """An on/off value as written in an environment variable."""
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(text)
    return text.lower() in ("1", "true", "yes")


class listing:
    """A comma-separated list as a tuple of `item`s: '1.2,2' -> (1.2, 2.0); '' -> () (none)."""

    def __init__(self, item) -> None:
        self.item = item
        self.__name__ = f"comma-separated {item.__name__} list"

    def __call__(self, text: str) -> tuple:
        return tuple(self.item(x.strip()) for x in text.split(",") if x.strip())


def option(default, kind, help_: str, **extra):
    """A declared option. `extra`: choices; blank_is_value (an empty environment variable is a value,
    not "unset"); flag_name (for a flag that sets the field to the opposite of its default, e.g.
    "--no-chat" for chat=True); shown (the default as help should describe it); one_of (a group name:
    the command line takes exactly one of the group's options); required (the command line requires it)."""
    return field(default=default, metadata={"kind": kind, "help": help_, **extra})


def flag_of(name: str) -> str:
    """The command-line spelling of a field: kv_ratio -> --kv-ratio."""
    return "--" + name.replace("_", "-")


def cite(*names: str, conj: str = "or") -> str:
    """Options named for a Python caller and a CLI user: 'steps or minutes (--steps, --minutes)'."""
    words = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {conj} {names[-1]}"
    return f"{words} ({', '.join(flag_of(n) for n in names)})"


def invalid(name: str, value, problem: str) -> str:
    """'kv_ratio=5.0 must lie in [1, 4.5] (--kv-ratio)': a bad value, named both ways."""
    return f"{name}={value!r} {problem} ({flag_of(name)})"


def env_var(name: str, prefix: str) -> str:
    return f"{prefix}{name.upper()}"


def declared(cls, exclude=()) -> list[Field]:
    """The fields of `cls` declared with `option` (plain fields are not options of the command line)."""
    return [f for f in fields(cls) if "help" in f.metadata and f.name not in exclude]


def shown(value) -> str:
    """A default as help prints it: 2.0 -> 2, (1.2, 2.0) -> 1.2,2, () -> none."""
    if value is None or value == ():
        return "none"
    if isinstance(value, tuple):
        return ",".join(shown(v) for v in value)
    if isinstance(value, float) and float(f"{value:g}") == value:
        return f"{value:g}"
    return str(value)


def help_of(f: Field, env_prefix: str | None = None) -> str:
    meta, notes = f.metadata, []
    if "shown" in meta:
        notes.append(f"default {meta['shown']}")
    elif meta["kind"] is flag and "flag_name" in meta:
        notes.append(f"default {f.name}={f.default!r}")
    elif meta["kind"] is flag:
        notes.append("default off" if not f.default else "default on")
    elif not (meta.get("one_of") or meta.get("required")):
        notes.append(f"default {shown(f.default)}")
    if env_prefix:
        notes.append(f"env {env_var(f.name, env_prefix)}")
    text = f"{meta['help']} ({'; '.join(notes)})" if notes else meta["help"]
    return text.replace("%", "%%")  # argparse formats help with %


def add_arguments(parser: argparse.ArgumentParser, cls, env_prefix: str | None = None, exclude=()) -> None:
    """One flag per declared field of `cls`. Defaults stay None (the flag was not given), so that
    environment variables and then the dataclass fill them (`options_from`)."""
    groups, ordered = {}, []
    for f in declared(cls, exclude):  # a group's members side by side (argparse's usage line needs them so)
        group = f.metadata.get("one_of")
        if f not in ordered:
            ordered += [g for g in declared(cls, exclude) if g.metadata.get("one_of") == group] if group else [f]
    for f in ordered:
        meta = f.metadata
        target = parser
        if meta.get("one_of"):
            if meta["one_of"] not in groups:
                groups[meta["one_of"]] = parser.add_mutually_exclusive_group(required=True)
            target = groups[meta["one_of"]]
        name, help_ = meta.get("flag_name", flag_of(f.name)), help_of(f, env_prefix)
        if meta["kind"] is flag:
            target.add_argument(name, dest=f.name, action="store_const", const=not f.default, default=None,
                                help=help_)
        else:
            target.add_argument(name, dest=f.name, type=meta["kind"], default=None, choices=meta.get("choices"),
                                required=meta.get("required", False), help=help_)


def given_options(args: argparse.Namespace, cls, environ=None, env_prefix: str | None = None) -> dict:
    """The declared fields of `cls` that flags (first) or <PREFIX><NAME> variables set."""
    if env_prefix and environ is None:
        environ = os.environ
    given = {}
    for f in declared(cls):
        value = getattr(args, f.name, None)
        env = environ.get(env_var(f.name, env_prefix)) if env_prefix else None
        if value is None and (env or (env is not None and f.metadata.get("blank_is_value"))):
            name, kind = env_var(f.name, env_prefix), f.metadata["kind"]
            try:
                value = kind(env)
            except ValueError:
                raise ValueError(f"{name}={env!r} is not a valid {kind.__name__}") from None
            if f.metadata.get("choices") and value not in f.metadata["choices"]:
                raise ValueError(f"{name}={env!r} must be one of {', '.join(f.metadata['choices'])}")
        if value is not None:
            given[f.name] = value
    return given


def options_from(args: argparse.Namespace, cls, environ=None, env_prefix: str | None = None):
    """An instance of `cls`: flags first, then <PREFIX><NAME> variables (with a prefix), then the defaults."""
    return cls(**given_options(args, cls, environ, env_prefix))


def options_record(opt) -> dict:
    """Every option of an options dataclass as a report records it (JSON values): what the model
    cache compares before reusing a folder, so that a changed default never passes for the old one."""
    return json.loads(json.dumps(asdict(opt), default=str))
