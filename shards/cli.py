"""Command-line flags from a config dataclass, validated by the same code as config files (`relret.config`).

    parser = dataclass_parser(BuildConfig, prog="shards/build.py", description="...")
    cfg = parse_dataclass(BuildConfig, parser, argv)

Each field becomes `--field-name`: required when it has no default; `bool` as `--flag/--no-flag`; `list[X]` repeated
(`--flag a --flag b`); `X | None` and `Literal[...]` (as choices) take one value. The help text is the docstring under
the field. Field metadata may add `choices` (a sequence, or a callable returning one, for names from a registry) and
`metavar`. Flags that are not given are left out, so the dataclass's own defaults apply, and the values given go
through `relret.config.from_dict`: unknown keys, wrong types and the dataclass's `__post_init__` checks are refused
the same way as in a YAML config.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from relret.config import ConfigError, from_dict

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right under it in the class body), whitespace collapsed; the
    dataclass's bases first, so that a subclass may redefine a field's text."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def flag(name: str) -> str:
    """The command-line flag of a field: `samples_per_shard` -> `--samples-per-shard`."""
    return "--" + name.replace("_", "-")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per init field of dataclass `cls` (see the module docstring)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kwargs: dict[str, Any] = {"help": docs.get(f.name, "").replace("%", "%%"), "default": argparse.SUPPRESS}
        if required:
            kwargs["required"] = True
        tp = _strip_none(hints[f.name])
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin in (list, tuple, Sequence):
            args = typing.get_args(tp)
            kwargs.update(action="append", type=_scalar_parser(args[0] if args else str, f.name))
        else:
            kwargs["type"] = _scalar_parser(tp, f.name)
            if origin is Literal:
                kwargs["choices"] = typing.get_args(tp)
        choices = f.metadata.get("choices")
        if choices is not None:
            kwargs["choices"] = tuple(choices() if callable(choices) else choices)
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        parser.add_argument(flag(f.name), dest=f.name, **kwargs)


def dataclass_parser(cls: type, **parser_kwargs: Any) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of `cls`; keyword arguments go to ArgumentParser."""
    parser = argparse.ArgumentParser(**parser_kwargs)
    add_dataclass_flags(parser, cls)
    return parser


def from_args(cls: type[T], args: argparse.Namespace | dict[str, Any]) -> T:
    """The dataclass from parsed flags (only those given; the rest keep their defaults), through `from_dict`.

    A check in the dataclass's `__post_init__` is reported in its own words (it names the flag); other problems as
    `from_dict` words them (the field's name)."""
    values = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    try:
        return from_dict(cls, values)
    except ConfigError as exc:
        cause = exc.__cause__
        raise ConfigError(str(cause) if isinstance(cause, ValueError) else str(exc)) from None


def parse_dataclass(cls: type[T], parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> T:
    """Parse `argv` with `parser` (built by `dataclass_parser(cls)`) into `cls`. Malformed flags exit through
    argparse (status 2); values `cls` refuses raise ConfigError."""
    return from_args(cls, parser.parse_args(argv))


def _strip_none(tp: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _scalar_parser(tp: Any, name: str):
    """The argparse `type` for one value of annotation `tp` (the value is then checked by `from_dict`)."""
    if typing.get_origin(tp) is Literal:
        kinds = {type(a) for a in typing.get_args(tp)}
        return kinds.pop() if len(kinds) == 1 else str
    if tp in (int, float, str):
        return tp
    raise TypeError(f"field {name}: no command-line form for the annotation {tp!r}")
