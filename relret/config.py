"""Typed configuration: dataclasses hold every default, YAML files hold differences, dotted CLI overrides come last.

    cfg = load_config(TrainConfig, "configs/pretrain.yaml", ["loss.direction=both", "optim.lr=1e-5"])

Precedence is CLI > YAML > defaults. Unknown keys and values of the wrong type are refused with a `ConfigError`
naming the dotted key and the allowed keys or values. Section dataclasses validate their own invariants in
`__post_init__`. This module only knows about configuration; it imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is not acceptable; the message names the dotted key."""


def check_choices(obj: Any, prefix: str) -> None:
    """Refuse a Literal-typed field holding a value outside its choices (also when built directly in Python)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        if typing.get_origin(tp) is Literal:
            _convert(getattr(obj, f.name), tp, f"{prefix}.{f.name}")


# ---------------------------------------------------------------------------------------------------------------------
# Sections defined by the method's core. Training, data and model sections live beside the code that uses them and
# reuse the machinery below.


@dataclasses.dataclass
class RelevanceConfig:
    """How the target relevance g of a clip to a caption is computed from Sentence-BERT similarities."""

    fn: Literal["logistic", "minmax", "binary"] = "logistic"
    """logistic: g = 1/(1+exp(a - b h)) (the paper); minmax: h min-max scaled per query; binary: own clip only."""
    a: float = 2.73
    """Logistic offset; the paper's value was fitted for all-mpnet-base-v2 (see `relret calibrate`)."""
    b: float = 4.58
    """Logistic slope."""
    aggregate: Literal["paired", "mean", "max"] = "paired"
    """Which captions of a clip h is taken against: the one paired in the batch (the paper), or mean/max over all."""
    calibration: str | None = None
    """YAML written by `relret calibrate`; when set, its `a` and `b` replace the two fields above."""

    def __post_init__(self) -> None:
        check_choices(self, "loss.relevance")

    def resolved(self) -> RelevanceConfig:
        """A copy with `a` and `b` read from the calibration file (if one is named) and `calibration` kept for record."""
        if self.calibration is None:
            return self
        path = Path(self.calibration)
        if not path.is_file():
            raise ConfigError(f"relevance.calibration: no file {path}; write one with `python -m relret calibrate`")
        with path.open(encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
        if not isinstance(data, Mapping) or not all(isinstance(data.get(k), (int, float)) for k in ("a", "b")):
            raise ConfigError(f"relevance.calibration: {path} has no numeric top-level keys 'a' and 'b'")
        return dataclasses.replace(self, a=float(data["a"]), b=float(data["b"]))


@dataclasses.dataclass
class LossConfig:
    """The training objective over the global batch."""

    name: Literal["listnet", "infonce"] = "listnet"
    """listnet: cross-entropy between softmax(g/omega) and softmax(cos/tau); infonce: the binary baseline."""
    direction: Literal["t2a", "a2t", "both"] = "t2a"
    """t2a ranks clips for each caption (ListNet_audio), a2t captions for each clip (ListNet_text), both averages."""
    tau: float = 0.05
    """Temperature of the predicted distribution softmax(cos/tau)."""
    omega: float = 0.05
    """Temperature of the target distribution softmax(g/omega) (ListNet only)."""
    local_loss: bool = True
    """Each rank scores only its own rows against the gathered columns (open_clip's local_loss)."""
    gather_with_grad: bool = True
    """Gather embeddings with autograd so gradients are exact; False drops other ranks' terms (open_clip's cheap mode)."""
    relevance: RelevanceConfig = dataclasses.field(default_factory=RelevanceConfig)
    """Target relevance (ListNet only)."""

    def __post_init__(self) -> None:
        check_choices(self, "loss")
        for key in ("tau", "omega"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"loss.{key} must be > 0, got {getattr(self, key)!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Machinery


_YAML11_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert where lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"{key}: expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple, Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        k_tp, v_tp = args if args else (Any, Any)
        return {_convert(k, k_tp, key): _convert(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_EXPONENT.match(value):
            # YAML 1.1 (PyYAML) reads 2e-5 as a string: it wants a dot in the mantissa (2.0e-5).
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"config field {key} has an annotation the loader does not handle: {tp!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a (possibly partial) mapping; missing fields keep their defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = prefix or cls.__name__
        bad = ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in unknown)
        raise ConfigError(f"unknown key {bad}; the keys of {where} are: {', '.join(fields)}")
    kwargs = {
        name: _convert(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config, suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"loss.relevance.a=3.1"` -> (["loss", "relevance", "a"], 3.1); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with path.open(encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    return dict(data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of `cls`, then the YAML file at `path` (differences only), then dotted `overrides`."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        data = merge(data, nested)
    return from_dict(cls, data)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
