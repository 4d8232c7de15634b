"""The pipeline's configuration: which stages run, in what order, with which resources.

    cfg = load_pipeline("configs/pipeline.yaml", ["stages.shard.enabled=false", "resources.partition=gpu"])

Defaults live in the dataclasses, configs/pipeline.yaml holds the chain, dotted overrides come last (the same
machinery as relret.config). Relative paths are taken from the directory the launcher runs in, like paths on a
command line, except sbatch scripts and the training entry point, which are taken from the repository, and training
configs, taken from the launch directory when they are there and from the repository otherwise; all are made absolute
before anything is submitted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from launcher.grid import Axis, CostModel, expand_stages
from relret.config import (
    ConfigError,
    TrainConfig,
    check_choices,
    config_differences,
    load_config,
    load_saved_config,
    to_dict,
)
from relret.run_dir import CHECKPOINTS, CONFIG_FILE, read_status

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Resources:
    """What a stage asks SLURM for. None leaves the sbatch script's own #SBATCH default in place."""

    partition: str | None = None
    """--partition; site-specific, so unset by default."""
    account: str | None = None
    """--account."""
    qos: str | None = None
    """--qos."""
    time: str | None = None
    """--time limit, e.g. "24:00:00"; the job is warned `warning_s` before it and requeues itself."""
    nodes: int | None = None
    """--nodes."""
    gpus_per_node: int | None = None
    """GPUs per node; one training process per GPU, so it sets --gpus-per-node=N and --ntasks-per-node=N."""
    ntasks_per_node: int | None = None
    """Processes per node when no GPUs are asked for (CPU ranks); must equal gpus_per_node when both are set."""
    cpus_per_task: int | None = None
    """--cpus-per-task (data-loading workers and threads per training process)."""
    mem: str | None = None
    """--mem per node, e.g. "200G"."""
    constraint: str | None = None
    """--constraint, e.g. "a100"."""
    warning_s: int | None = None
    """Seconds before the time limit at which SLURM sends SIGUSR1 (--signal=B:USR1@N); the scripts default to 300."""
    extra: list[str] = dataclasses.field(default_factory=list)
    """Further sbatch options, passed verbatim (e.g. ["--exclusive", "--reservation=r1"])."""

    def __post_init__(self) -> None:
        for key in ("nodes", "gpus_per_node", "ntasks_per_node", "cpus_per_task", "warning_s"):
            value = getattr(self, key)
            if value is not None and value < (0 if key == "gpus_per_node" else 1):
                raise ConfigError(f"resources.{key} must be a positive integer, got {value}")
        if self.gpus_per_node and self.ntasks_per_node not in (None, self.gpus_per_node):
            raise ConfigError(
                f"resources: gpus_per_node={self.gpus_per_node} but ntasks_per_node={self.ntasks_per_node}; training "
                "runs one process per GPU, so leave ntasks_per_node unset (or equal to gpus_per_node)"
            )

    def over(self, base: Resources) -> Resources:
        """These resources where set, `base` elsewhere; `extra` options are appended to base's."""
        merged = {
            f.name: getattr(self, f.name) if getattr(self, f.name) is not None else getattr(base, f.name)
            for f in dataclasses.fields(self)
            if f.name != "extra"
        }
        return Resources(**merged, extra=[*base.extra, *self.extra])

    def sbatch_args(self) -> list[str]:
        """The sbatch options for these resources."""
        args = []
        for key, flag in (
            ("partition", "--partition"),
            ("account", "--account"),
            ("qos", "--qos"),
            ("time", "--time"),
            ("nodes", "--nodes"),
            ("cpus_per_task", "--cpus-per-task"),
            ("mem", "--mem"),
            ("constraint", "--constraint"),
        ):
            if getattr(self, key) is not None:
                args.append(f"{flag}={getattr(self, key)}")
        if self.gpus_per_node:
            args += [f"--gpus-per-node={self.gpus_per_node}", f"--ntasks-per-node={self.gpus_per_node}"]
        elif self.ntasks_per_node is not None:
            args.append(f"--ntasks-per-node={self.ntasks_per_node}")
        if self.warning_s is not None:
            args.append(f"--signal=B:USR1@{self.warning_s}")
        return args + list(self.extra)


@dataclasses.dataclass
class StageConfig:
    """One step of the pipeline: a training run (`config` set) or a command (`command` set)."""

    enabled: bool = True
    """A disabled stage is not submitted; stages after it do not wait for it (its outputs must already exist)."""
    config: str | None = None
    """Training config (configs/*.yaml) for relret/train.py; makes this a training stage. Relative: from the launch
    directory when the file is there, else from the repository."""
    overrides: list[str] = dataclasses.field(default_factory=list)
    """Dotted training overrides for this stage, after the pipeline's `overrides` (placeholders as in `command`)."""
    init_from: str | None = None
    """Name of the stage whose run directory this training starts from (--init-from); implies `after` it."""
    command: list[str] = dataclasses.field(default_factory=list)
    """The command of a non-training stage (shard, evaluate), one argument per item. Placeholders: {python},
    {run_root}, {run_dir} (this stage's), {repo}, and {stages[NAME]} (another stage's run directory); other braces
    are kept as written."""
    after: list[str] = dataclasses.field(default_factory=list)
    """Stages that must finish successfully first (afterok)."""
    script: str | None = None
    """The sbatch script; default slurm/pretrain.sh, or slurm/finetune.sh with init_from; required for commands."""
    run_dir: str | None = None
    """Where the stage writes (status.json, checkpoints); default RUN_ROOT/NAME."""
    resources: Resources = dataclasses.field(default_factory=Resources)
    """Resources for this stage, over the pipeline's."""
    only: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    """A stage template's subset of an axis's labels, e.g. {method: [infonce, listnet_audio]} (default: all)."""

    @property
    def kind(self) -> Literal["train", "command"]:
        return "train" if self.config is not None else "command"

    @property
    def parents(self) -> list[str]:
        return list(dict.fromkeys([*([self.init_from] if self.init_from else []), *self.after]))


@dataclasses.dataclass
class PipelineConfig:
    """The chain of stages and what they share."""

    run_root: str = "runs/pipeline"
    """Root of the pipeline's run directories, logs and state file (pipeline.json)."""
    python: str | None = None
    """Python interpreter of the jobs; default the one running the launcher."""
    train_script: str = "relret/train.py"
    """The training entry point, relative to the repository unless absolute."""
    overrides: list[str] = dataclasses.field(default_factory=list)
    """Dotted training overrides for every training stage (e.g. ["loss.name=infonce"])."""
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """Environment variables for every stage (e.g. DS_ACCELERATOR: cpu)."""
    max_restarts: int = 10
    """A job stops requeueing itself after this many restarts (SLURM_RESTART_COUNT); see slurm/lib.sh."""
    resources: Resources = dataclasses.field(default_factory=Resources)
    """Defaults for every stage's resources."""
    local_ranks: int = 2
    """Processes per training stage in local mode (`deepspeed --num_gpus N`, CPU ranks without a GPU)."""
    stages: dict[str, StageConfig] = dataclasses.field(default_factory=dict)
    """The stages by name, in any order; dependencies come from `after` and `init_from`. With a `grid`, a name may
    hold {axis} placeholders: a template expanded into one stage per combination of labels (launcher/grid.py)."""
    grid: dict[str, Axis] = dataclasses.field(default_factory=dict)
    """The experiment grid's axes by name: labels with training overrides, or a training key with its values."""
    estimate: CostModel = dataclasses.field(default_factory=CostModel)
    """What the dry run's GPU-hour estimate assumes (FLOPs per sample, MFU, clips per shard directory)."""

    def __post_init__(self) -> None:
        # Stage templates become stages first; everything below checks the expanded stages. `expanded_from` maps each
        # stage to its template (itself when shared), for the plan; it is no config field, so configs never hold it.
        self.stages, self.expanded_from = expand_stages(self.stages, self.grid)
        if self.max_restarts < 0:
            raise ConfigError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.local_ranks < 1:
            raise ConfigError(f"local_ranks must be >= 1, got {self.local_ranks}")
        if not self.stages:
            raise ConfigError("stages: the pipeline has no stages; name at least one (see configs/pipeline.yaml)")
        for name, stage in self.stages.items():
            check_choices(stage, f"stages.{name}")
            if (stage.config is None) == (not stage.command):
                raise ConfigError(
                    f"stages.{name}: give either `config` (a training stage) or `command` (any other stage), "
                    f"not {'both' if stage.config else 'neither'}"
                )
            if stage.kind == "command" and stage.init_from:
                raise ConfigError(f"stages.{name}.init_from: only training stages start from another run")
            if stage.kind == "command" and stage.script is None:
                raise ConfigError(
                    f"stages.{name}.script: a command stage needs its sbatch script, e.g. slurm/evaluate.sh"
                )
            for parent in stage.parents:
                if parent not in self.stages:
                    raise ConfigError(
                        f"stages.{name}: depends on unknown stage {parent!r}; the stages are: {', '.join(self.stages)}"
                    )
        self.order()  # refuses cycles now rather than at submission

    def order(self) -> list[str]:
        """Stage names with every stage after its parents (config order among independent stages)."""
        done: list[str] = []
        visiting: list[str] = []

        def visit(name: str) -> None:
            if name in done:
                return
            if name in visiting:
                cycle = " -> ".join([*visiting[visiting.index(name) :], name])
                raise ConfigError(f"stages: dependency cycle {cycle}")
            visiting.append(name)
            for parent in self.stages[name].parents:
                visit(parent)
            visiting.pop()
            done.append(name)

        for name in self.stages:
            visit(name)
        return done

    def stage_resources(self, name: str) -> Resources:
        return self.stages[name].resources.over(self.resources)

    def run_dir(self, name: str) -> Path:
        stage = self.stages[name]
        return absolute(stage.run_dir) if stage.run_dir else absolute(self.run_root) / name

    def train_config(self, name: str) -> Path:
        """A training stage's config file: a relative path is taken from the directory the launcher runs in when it is
        there, else from the repository (so that the shipped configs/*.yaml work from the directory that holds the
        data)."""
        config = self.stages[name].config
        assert config is not None, f"stage {name} is not a training stage"
        here, shipped = absolute(config), absolute(config, REPO)
        return shipped if not here.is_file() and shipped.is_file() else here

    def script(self, name: str) -> Path:
        stage = self.stages[name]
        if stage.script is not None:
            return absolute(stage.script, REPO)
        return REPO / "slurm" / ("finetune.sh" if stage.init_from else "pretrain.sh")


def absolute(path: str | Path, base: Path | None = None) -> Path:
    """`path` made absolute against `base` (default: the current directory), without resolving links."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else (base or Path.cwd()) / path


def changed_config_problems(name: str, run_dir: Path, current: TrainConfig) -> list[str]:
    """A stage whose run directory already holds a started run (a checkpoint, or completed) with another config is
    refused before submission, naming the keys, as relret/train.py refuses such a resume (the keys that may change
    are relret.config.RESUMABLE_CHANGES). A completed run would otherwise be skipped with its old config silently."""
    saved_path = run_dir / CONFIG_FILE
    status = read_status(run_dir)
    started = (run_dir / CHECKPOINTS).is_dir() or (status is not None and status.state == "completed")
    if not (started and saved_path.is_file()):
        return []
    try:
        saved = load_saved_config(saved_path)
    except ConfigError as exc:
        return [f"stages.{name}: {saved_path} does not load ({exc})"]
    diff = config_differences(to_dict(saved), to_dict(current))
    if not diff:
        return []
    return [
        f"stages.{name}: run directory {run_dir} was started with another config ({saved_path}); differing keys: "
        f"{', '.join(diff)}. Use a new run_root (or stages.{name}.run_dir), or the config it was started with"
    ]


def load_pipeline(path: str | Path | None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Defaults, then the YAML file, then dotted overrides; errors name the key."""
    return load_config(PipelineConfig, path, overrides)
