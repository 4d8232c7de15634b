"""The experiment grid: axes that expand stage templates into stages, and the cost estimate the dry run prints.

    grid:
      method:                                   # an axis of labels, each a list of dotted training overrides
        labels:
          infonce: [loss.name=infonce]
          listnet_audio: [loss.name=listnet, loss.direction=t2a]
      seed: {key: train.seed, values: [0, 1, 2]}   # any training key: each value V sets key=V, labelled V
      dataset:                                  # labels may also carry named strings for commands: {dataset.eval}
        labels:
          clotho: {vars: {eval: data/shards/clotho/evaluation}}
    stages:
      pretrain_{method}_s{seed}: {config: configs/pretrain.yaml}            # one stage per method and seed
      ft_{dataset}_{method}_s{seed}: {config: ..., init_from: pretrain_{method}_s{seed}}
      tables: {command: [...], after: ["ft_{dataset}_{method}_s{seed}"]}   # shared: waits for every match

A stage's name says which axes it varies over; it becomes one stage per combination of their labels (`only`
narrows an axis to some labels). The same placeholders are filled in its config, overrides, command, init_from,
after, run_dir and script; `{axis.var}` gives a label's named string. A stage whose name uses no axis is shared. In
`after`, a placeholder of an axis the stage does not vary over matches every expanded stage of that form (a fan-in);
anywhere else it is an error. A training stage gets, in this order, the labels' overrides (a keyed axis: key=V), its
own overrides, and the learning rate of an axis's `lr_scaling` rule. Two expansions to one name are refused, naming
both.

The estimate is FLOPs per training sample x samples / (MFU x peak): an estimate, not a measurement (see CostModel).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from relret.config import ConfigError, TrainConfig, check_choices

S = TypeVar("S")

RESERVED = ("python", "run_root", "run_dir", "repo", "stages")
"""Placeholders the pipeline fills at submission (launcher.pipeline.stage_args); no axis may take these names."""
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*$")
_BRACED = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?\}")


@dataclasses.dataclass
class AxisLabel:
    """What one label of a label axis sets."""

    overrides: list[str] = dataclasses.field(default_factory=list)
    """Dotted training overrides (training stages only)."""
    vars: dict[str, str] = dataclasses.field(default_factory=dict)
    """Named strings, `{axis.name}` in any stage field (e.g. the evaluation shards of a dataset)."""


@dataclasses.dataclass
class Axis:
    """One dimension of the grid: either `labels` (label -> overrides) or a training `key` with its `values`."""

    labels: dict[str, list[str] | AxisLabel] = dataclasses.field(default_factory=dict)
    """Label -> a list of dotted training overrides, or {overrides: [...], vars: {name: string}}."""
    key: str | None = None
    """A dotted training key (any key of relret.config.TrainConfig); each of `values` sets key=value."""
    values: list[Any] = dataclasses.field(default_factory=list)
    """The values of `key`; each is labelled by its text (0 -> "0", 1.0e-5 -> "1e-05")."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """With key train.global_batch_size: also set optim.lr = lr_reference x (B / lr_reference_batch) (linear) or
    x sqrt(B / lr_reference_batch) (sqrt); optim.min_lr is kept. none: the learning rate is left alone."""
    lr_reference_batch: int | None = None
    """The global batch size at which the learning rate is `lr_reference` (required by a scaling rule)."""
    lr_reference: float | None = None
    """The learning rate at `lr_reference_batch` (required by a scaling rule)."""

    def __post_init__(self) -> None:
        check_choices(self, "grid axis")
        self.labels = {
            label: value if isinstance(value, AxisLabel) else AxisLabel(overrides=list(value))
            for label, value in self.labels.items()
        }

    def label_names(self) -> list[str]:
        return list(self.labels) if self.labels else [value_label(v) for v in self.values]

    def overrides(self, label: str) -> list[str]:
        """The training overrides of one label."""
        if self.labels:
            return list(self.labels[label].overrides)
        value = self.values[self.label_names().index(label)]
        return [f"{self.key}={json.dumps(value)}"]  # JSON is YAML: strings stay strings, numbers numbers

    def lr_overrides(self, label: str) -> list[str]:
        """The learning rate the `lr_scaling` rule gives one batch size (nothing without a rule)."""
        if self.lr_scaling == "none":
            return []
        ratio = self.values[self.label_names().index(label)] / self.lr_reference_batch
        lr = self.lr_reference * (ratio if self.lr_scaling == "linear" else math.sqrt(ratio))
        return [f"optim.lr={lr!r}"]


def value_label(value: Any) -> str:
    """The label of a keyed axis's value, as it appears in stage names."""
    return json.dumps(value) if isinstance(value, bool) else str(value)


def check_axes(grid: Mapping[str, Axis]) -> None:
    """Refuse axes that could not expand: bad names, no labels, both or neither form, an incomplete lr rule."""
    for name, axis in grid.items():
        where = f"grid.{name}"
        if not _NAME.match(name) or name in RESERVED:
            raise ConfigError(
                f"{where}: an axis name must be an identifier and none of {', '.join(RESERVED)} (placeholders the "
                "pipeline fills itself)"
            )
        if bool(axis.labels) == (axis.key is not None):
            raise ConfigError(f"{where}: give either `labels` (label -> overrides) or `key` with `values`, not both")
        if axis.key is not None and not axis.values:
            raise ConfigError(f"{where}.values: the axis on {axis.key} has no values")
        if axis.values and axis.key is None:
            raise ConfigError(f"{where}.values: values need the training `key` they set")
        labels = axis.label_names()
        for label in labels:
            if not _LABEL.match(label):
                raise ConfigError(
                    f"{where}: label {label!r} is not usable in stage names and paths (letters, digits, . _ + -)"
                )
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ConfigError(f"{where}: label(s) {', '.join(repeated)} given twice")
        if axis.lr_scaling != "none":
            if axis.key != "train.global_batch_size":
                raise ConfigError(
                    f"{where}.lr_scaling: a learning-rate rule scales with the batch size, so the axis's key must be "
                    f"train.global_batch_size, not {axis.key}"
                )
            if not (axis.lr_reference_batch and axis.lr_reference_batch > 0 and axis.lr_reference):
                raise ConfigError(
                    f"{where}: lr_scaling={axis.lr_scaling} needs lr_reference_batch (a batch size > 0) and "
                    "lr_reference (the learning rate at that batch size)"
                )
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in axis.values):
                raise ConfigError(f"{where}.values: batch sizes must be positive integers, got {axis.values}")


# ---------------------------------------------------------------------------------------------------------------------
# Expansion


def _fields_with_placeholders(stage: Any) -> dict[str, Any]:
    return {
        "config": stage.config,
        "overrides": stage.overrides,
        "command": stage.command,
        "run_dir": stage.run_dir,
        "script": stage.script,
    }


def name_axes(template: str, grid: Mapping[str, Axis]) -> list[str]:
    """The axes a stage template varies over (those its name uses), in the order the name uses them: the stages of
    `t2_{dataset}_{method}_s{seed}` come out dataset by dataset, method by method, seed by seed."""
    used = []
    for match in _BRACED.finditer(template):
        axis, var = match.groups()
        if axis not in grid:
            axes = ", ".join(grid) or "none (no `grid` section)"
            raise ConfigError(f"stages.{template}: {match.group(0)} in the name is no axis; the axes are: {axes}")
        if var is not None:
            raise ConfigError(f"stages.{template}: use {{{axis}}} in a stage name, not {match.group(0)}")
        used.append(axis)
    return list(dict.fromkeys(used))


def expand_stages(stages: Mapping[str, S], grid: Mapping[str, Axis]) -> tuple[dict[str, S], dict[str, str]]:
    """Stage templates -> concrete stages, and each stage's template name. See the module docstring for the rules.

    `stages` are launcher.config.StageConfig objects (any dataclass with their fields); they are copied, not changed."""
    check_axes(grid)
    pattern = (
        re.compile(r"\{(" + "|".join(map(re.escape, grid)) + r")(?:\.([A-Za-z_][A-Za-z0-9_]*))?\}") if grid else None
    )

    # Every name first: fan-ins in `after` match against the complete set.
    origin: dict[str, tuple[str, dict[str, str]]] = {}
    for template, stage in stages.items():
        axes = name_axes(template, grid)
        only = stage.only
        for axis, wanted in only.items():
            if axis not in axes:
                raise ConfigError(
                    f"stages.{template}.only: {axis!r} is not an axis of this stage (its name uses: "
                    f"{', '.join(axes) or 'none'})"
                )
            unknown = [value_label(w) for w in wanted if value_label(w) not in grid[axis].label_names()]
            if unknown or not wanted:
                raise ConfigError(
                    f"stages.{template}.only.{axis}: {', '.join(unknown) or 'no labels'}; the labels of {axis} are: "
                    f"{', '.join(grid[axis].label_names())}"
                )
        choices = [
            [label for label in grid[a].label_names() if a not in only or label in map(value_label, only[a])]
            for a in axes
        ]
        for combo in itertools.product(*choices):
            binding = dict(zip(axes, combo))
            name = _fill(template, binding, grid, pattern, f"stages.{template}") if axes else template
            if name in origin:
                raise ConfigError(
                    f"stages: {_describe(*origin[name])} and {_describe(template, binding)} both expand to {name!r}; "
                    "rename one of them"
                )
            origin[name] = (template, binding)

    out: dict[str, S] = {}
    for name, (template, binding) in origin.items():
        stage = stages[template]
        where = f"stages.{template}"

        fields = {
            key: _fill_value(value, binding, grid, pattern, f"{where}.{key}")
            for key, value in _fields_with_placeholders(stage).items()
        }
        init_from = _fill_value(stage.init_from, binding, grid, pattern, f"{where}.init_from")
        after = []
        for entry in stage.after:
            after += _fan_in(entry, binding, grid, pattern, origin, f"{where}.after")
        if stage.config is not None:  # training: the labels' overrides, its own, then a learning-rate rule's
            labels = [o for axis, label in binding.items() for o in grid[axis].overrides(label)]
            rules = [o for axis, label in binding.items() for o in grid[axis].lr_overrides(label)]
            fields["overrides"] = labels + fields["overrides"] + rules
        out[name] = dataclasses.replace(stage, **fields, init_from=init_from, after=list(dict.fromkeys(after)), only={})
    return out, {name: template for name, (template, _) in origin.items()}


def _describe(template: str, binding: Mapping[str, str]) -> str:
    values = ", ".join(f"{k}={v}" for k, v in binding.items())
    return f"{template!r}" + (f" ({values})" if values else "")


def _fill_value(
    value: Any, binding: Mapping[str, str], grid: Mapping[str, Axis], pattern: re.Pattern | None, key: str
) -> Any:
    """A stage field with the stage's labels filled in (strings, and strings inside lists)."""
    if isinstance(value, str):
        return _fill(value, binding, grid, pattern, key)
    if isinstance(value, list):
        return [_fill_value(v, binding, grid, pattern, key) for v in value]
    return value


def _fill(text: str, binding: Mapping[str, str], grid: Mapping[str, Axis], pattern: re.Pattern | None, key: str) -> str:
    if pattern is None:
        return text

    def one(match: re.Match) -> str:
        axis, var = match.groups()
        if axis not in binding:
            raise ConfigError(
                f"{key}: {match.group(0)} names axis {axis!r}, which this stage does not vary over (put {{{axis}}} in "
                "its name, or write the value out)"
            )
        if var is None:
            return binding[axis]
        label = grid[axis].labels.get(binding[axis]) if grid[axis].labels else None
        if label is None or var not in label.vars:
            have = (", ".join(sorted(label.vars)) or "none") if label else "none (a keyed axis)"
            raise ConfigError(f"{key}: {match.group(0)}: label {binding[axis]!r} of {axis} has no var {var!r}: {have}")
        return label.vars[var]

    return pattern.sub(one, text)


def _fan_in(
    entry: str,
    binding: Mapping[str, str],
    grid: Mapping[str, Axis],
    pattern: re.Pattern | None,
    names: Mapping[str, Any],
    key: str,
) -> list[str]:
    """One `after` entry: filled with the stage's own labels; placeholders of other axes match every stage."""
    if pattern is None:
        return [entry]
    found = (m.group(1) for m in pattern.finditer(entry) if m.group(2) is None and m.group(1) not in binding)
    free = list(dict.fromkeys(found))
    if not free:
        return [_fill(entry, binding, grid, pattern, key)]
    matches = []
    for combo in itertools.product(*(grid[a].label_names() for a in free)):
        name = _fill(entry, {**binding, **dict(zip(free, combo))}, grid, pattern, key)
        if name in names:
            matches.append(name)
    if not matches:
        raise ConfigError(f"{key}: {entry!r} matches no stage (filled over {', '.join(free)})")
    return matches


# ---------------------------------------------------------------------------------------------------------------------
# The cost estimate


@dataclasses.dataclass
class CostModel:
    """What the dry run's GPU-hour estimate assumes. An estimate, not a measurement.

    Training FLOPs of a stage = epochs x samples per epoch x (windows x kept x audio_tflop_per_window +
    text_tflop_per_caption), where a sample is a clip or a caption (data.epoch_unit), windows = ceil(data.crop_s /
    model.audio.window_s) (a batch is padded to its longest clip, so one clip at the crop length makes every sample
    of the batch cost that many windows) and kept = the share of PaSST's patch grid that structured patchout keeps in
    training (model.audio.s_patchout_t/f; audio cost taken as proportional to patches). Each validation adds a forward
    pass (a third of forward+backward) over the validation clips and captions. GPU-hours = FLOPs / (mfu x peak_tflops)
    / 3600. Data loading, checkpoints and queueing are not counted; command stages (shard, evaluate, tables) are not
    estimated."""

    mfu: float = 0.35
    """Model FLOP utilisation assumed for the estimate (bench/train.py --gpu-only measures it on a GPU)."""
    peak_tflops: float = 989.0
    """Dense bf16/fp16 peak of one GPU in TFLOP/s (989: H100 SXM / H200; A100: 312)."""
    audio_tflop_per_window: float = 0.27
    """Forward+backward TFLOP of PaSST-S on one 10 s window with every patch (8 x 62 = 496 patches)."""
    text_tflop_per_caption: float = 0.07
    """Forward+backward TFLOP of RoBERTa-large on one 32-token caption (6 x 355 M parameters x 32 tokens)."""
    clips: dict[str, int] = dataclasses.field(default_factory=dict)
    """Clips per shard directory, as the training configs name it (data.train paths and data.val): the counts the
    manifests will hold, known before sharding. A stage whose data is missing here is reported as not estimated."""
    captions: dict[str, int] = dataclasses.field(default_factory=dict)
    """Captions per shard directory where a clip has more than one (Clotho: 5 per clip); elsewhere one per clip."""

    def __post_init__(self) -> None:
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"estimate.mfu must be in (0, 1], got {self.mfu}")
        for key in ("peak_tflops", "audio_tflop_per_window", "text_tflop_per_caption"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"estimate.{key} must be > 0, got {getattr(self, key)}")

    def clip_count(self, path: str) -> int | None:
        return _lookup(self.clips, path)

    def caption_count(self, path: str) -> int | None:
        """Captions of a shard directory: `captions` where given, else one per clip."""
        found = _lookup(self.captions, path)
        return found if found is not None else self.clip_count(path)


def _lookup(table: Mapping[str, int], path: str) -> int | None:
    wanted = _normal(path)
    return next((n for p, n in table.items() if _normal(p) == wanted), None)


def _normal(path: str) -> str:
    p = Path(path).expanduser()
    return str((p if p.is_absolute() else Path.cwd() / p).resolve(strict=False)) if "://" not in path else path


def patchout_kept(audio: Any) -> float:
    """The share of PaSST's patch grid (n_mels x input_tdim in patches at `stride`) that structured patchout keeps."""
    rows = (audio.n_mels - audio.patch_size) // audio.stride + 1
    columns = (audio.input_tdim - audio.patch_size) // audio.stride + 1
    return max(rows - audio.s_patchout_f, 0) * max(columns - audio.s_patchout_t, 0) / (rows * columns)


@dataclasses.dataclass
class StageCost:
    """One training stage's estimate."""

    name: str
    template: str
    gpus: int
    samples: int | None
    tflop: float | None
    gpu_hours: float | None
    missing: list[str]
    """Shard directories without a clip count in `estimate.clips` (then nothing is estimated)."""


def stage_cost(name: str, template: str, cfg: TrainConfig, gpus: int, model: CostModel) -> StageCost:
    """The estimate of one training stage from its resolved training config."""
    train_paths = [s.path for s in cfg.data.train]
    by_caption = getattr(cfg.data, "epoch_unit", "clip") == "caption"
    needed = [*cfg.data.val, *(train_paths if cfg.data.samples_per_epoch is None else [])]
    missing = [p for p in needed if model.clip_count(p) is None]
    if missing:
        return StageCost(name, template, gpus, None, None, None, missing)
    count = model.caption_count if by_caption else model.clip_count
    per_epoch = cfg.data.samples_per_epoch or sum(count(p) for p in train_paths)
    samples = cfg.train.epochs * per_epoch
    audio, window = cfg.model.audio, cfg.model.audio.window_s
    per_window = model.audio_tflop_per_window
    per_sample = math.ceil(cfg.data.crop_s / window) * patchout_kept(audio) * per_window + model.text_tflop_per_caption
    validations = -(-cfg.train.epochs // cfg.train.val_every_epochs)
    val_windows = math.ceil(cfg.data.val_crop_s / window)
    per_validation = (
        sum(
            model.clip_count(p) * val_windows * per_window + model.caption_count(p) * model.text_tflop_per_caption
            for p in cfg.data.val
        )
        / 3
    )
    tflop = samples * per_sample + validations * per_validation
    return StageCost(name, template, gpus, samples, tflop, tflop / (model.mfu * model.peak_tflops) / 3600, [])


def format_plan(
    order: Sequence[str],
    templates: Mapping[str, str],
    kinds: Mapping[str, str],
    costs: Mapping[str, StageCost],
    completed: set[str],
    model: CostModel,
) -> str:
    """The plan as text: jobs per stage template, estimated GPU-hours, and what the estimate assumes."""
    groups: dict[str, list[str]] = {}
    for name in order:
        groups.setdefault(templates.get(name, name), []).append(name)
    width = max([len(t) for t in groups] + [14])
    head = f"{'stage template':<{width}}  {'jobs':>4}  {'GPUs':>4}  {'GPU-h per job':>13}  {'GPU-h':>8}  {'wall h/job':>10}"
    lines = [head, "-" * len(head)]
    total = todo = 0.0
    unknown: list[str] = []
    for template, names in groups.items():
        kind = kinds[names[0]]
        rows = [costs[n] for n in names if n in costs]
        gpus = rows[0].gpus if rows else 0
        hours = [r.gpu_hours for r in rows if r.gpu_hours is not None]
        unknown += [p for r in rows for p in r.missing]
        if kind != "train" or not hours:
            per_job = "-" if kind != "train" else "not estimated"
            lines.append(f"{template:<{width}}  {len(names):>4}  {'':>4}  {per_job:>13}  {'-':>8}  {'-':>10}")
            continue
        low, high = min(hours), max(hours)
        span = f"{low:.2f}" if math.isclose(low, high, rel_tol=0.005) else f"{low:.2f}-{high:.2f}"
        total += sum(hours)
        todo += sum(r.gpu_hours for r in rows if r.gpu_hours is not None and r.name not in completed)
        wall = f"{high / max(gpus, 1):.2f}"
        lines.append(f"{template:<{width}}  {len(names):>4}  {gpus:>4}  {span:>13}  {sum(hours):>8.1f}  {wall:>10}")
    n_train = sum(1 for n in order if kinds[n] == "train")
    lines.insert(
        0,
        f"Plan: {len(order)} jobs ({n_train} training, {len(order) - n_train} other) from {len(groups)} stage "
        f"templates; {len(order) - len(completed & set(order))} to run, {len(completed & set(order))} completed.",
    )
    lines.append("-" * len(head))
    lines.append(
        f"Estimated GPU-hours: {total:.1f} for every training job, {todo:.1f} for those not completed "
        "(command stages not estimated)."
    )
    if unknown:
        lines.append("Not estimated: no clip count in estimate.clips for " + ", ".join(sorted(set(unknown))) + ".")
    lines.append(
        "This is an estimate, not a measurement: FLOPs = epochs x samples (clips or captions: data.epoch_unit) x "
        f"(ceil(crop_s / window_s) x {model.audio_tflop_per_window} TFLOP per 10 s PaSST-S window x the share of "
        f"patches that structured patchout keeps + {model.text_tflop_per_caption} TFLOP per 32-token RoBERTa-large "
        "caption, forward+backward), plus a forward pass over the validation clips and captions per validation; "
        f"GPU-hours = FLOPs / (MFU {model.mfu} x {model.peak_tflops:g} TFLOP/s dense peak). The per-window and "
        "per-caption figures split the 0.34 TFLOP per 10 s clip and caption (no patchout) that bench/train.py counted "
        "with torch.utils.flop_counter (README, Performance); the MFU is assumed: measure it with `python "
        "bench/train.py --gpu-only` and set estimate.mfu. Data loading, checkpoints, restarts and queueing are not "
        "included; wall h/job is GPU-h per job over the job's GPUs."
    )
    return "\n".join(lines)


def estimate(
    order: Sequence[str],
    gpus_of: Callable[[str], int],
    training_config_of: Callable[[str], TrainConfig | None],
    templates: Mapping[str, str],
    model: CostModel,
) -> dict[str, StageCost]:
    """Estimates of the training stages in `order` (training_config_of gives None for other stages)."""
    out = {}
    for name in order:
        cfg = training_config_of(name)
        if cfg is not None:
            out[name] = stage_cost(name, templates.get(name, name), cfg, gpus_of(name), model)
    return out
