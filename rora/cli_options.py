"""Click options generated from the config dataclasses: each field's name, type, help and default live once, in
rora.config, and every command that exposes the field shows the same option."""
from __future__ import annotations

import dataclasses
import functools
import types
import typing

import click
from click.core import ParameterSource


def _csv(value: str | None) -> list[str] | None:
    """'a, b' -> ['a', 'b']; None or '' -> None (not given)."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def config_options(cls, *paths: str, required: tuple[str, ...] = ()):
    """Options --key-name for fields of the config class `cls`: a path is `key`, or `section.key` for a field of one
    of `cls`'s sections. The command receives each as `key`: None when not given, so the YAML's (or the dataclass's)
    value stays; the dataclass default is what --help shows."""
    fields = {path: _field(cls, path) for path in paths}

    def decorate(fn):
        @functools.wraps(fn)
        def command(**kwargs):
            ctx = click.get_current_context()
            for _, f in fields.values():  # the default is only there for --help to show it
                if ctx.get_parameter_source(f.name) is ParameterSource.DEFAULT:
                    kwargs[f.name] = None
            return fn(**kwargs)

        for path in reversed(paths):
            command = _option(*fields[path], path in required)(command)
        return command

    return decorate


def _field(cls, path: str):
    """(the dataclass that declares the field at `path`, the field)."""
    *section, key = path.split(".")
    owner = typing.get_type_hints(cls)[section[0]] if section else cls
    return owner, next(f for f in dataclasses.fields(owner) if f.name == key)


def _option(owner, f: dataclasses.Field, required: bool):
    hint = typing.get_type_hints(owner)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: None is the default, not a type
        (hint,) = [h for h in typing.get_args(hint) if h is not type(None)]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    flag = "--" + f.name.replace("_", "-")
    kwargs = {"help": f.metadata["help"], "required": required}
    if hint is bool:
        flag = f"{flag}/--no-{flag[2:]}"
    elif typing.get_origin(hint) is list:  # comma-separated on the command line
        default = ",".join(default) or None
        kwargs["callback"] = lambda ctx, param, value: _csv(value)
    else:
        kwargs["type"] = hint
    if not required and default is not None:
        kwargs.update(default=default, show_default=True)
    return click.option(flag, f.name, **kwargs)
