"""Several shard jobs in one Ray session: `shards/build.py --plan configs/shards.yaml`.

A plan is a YAML file of jobs, each the flags of one `shards/build.py` run as keys (underscores for dashes), over
`common` keys shared by all:

    common: {sbert: all-mpnet-base-v2, out: data/shards}
    jobs:
      - {dataset: clotho, captions: data/clotho/clotho_captions_development.csv, audio_dir: data/clotho/development}
      - {dataset: audiocaps, split: train, captions: data/audiocaps/train.csv, audio_dir: data/audiocaps/audio/train,
         audio_template: "Y{youtube_id}.wav"}

Every job is checked (its keys, its metadata file, its Sentence-BERT model) before Ray starts; then Ray starts once and
the jobs run one after another, each as `shards/build.py` would run it alone (same shards, same manifests, resumable),
sharing one pool of Sentence-BERT actors where their model and device agree.
A failing job stops the plan, naming the job; running the plan again skips the shards already written. Relative
paths are taken from the directory the command runs in, as on the command line.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relret.config import ConfigError, from_dict, read_config_file
from shards import cluster
from shards.readers import READERS


@dataclasses.dataclass
class Plan:
    """The jobs of a plan, resolved: `common` under each job's own keys."""

    jobs: list[Any]
    """BuildConfig per job, in the plan's order."""

    def label(self, i: int) -> str:
        cfg = self.jobs[i]
        return f"job {i + 1} of {len(self.jobs)} ({cfg.dataset}/{cfg.resolved_split()}, {cfg.captions})"


def load_plan(path: str | Path) -> Plan:
    """The plan file's jobs as BuildConfigs; a problem in any job is a ConfigError naming it."""
    from shards.job import BuildConfig

    data = read_config_file(path)
    unknown = sorted(set(data) - {"common", "jobs"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {', '.join(unknown)}; a plan has `common` (optional) and `jobs`")
    common, jobs = data.get("common") or {}, data.get("jobs")
    if not isinstance(common, dict):
        raise ConfigError(f"{path}: `common` must be a mapping of build.py options, got {common!r}")
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, dict) for j in jobs):
        raise ConfigError(f"{path}: `jobs` must be a non-empty list of mappings of build.py options")
    configs = []
    for i, job in enumerate(jobs):
        where = f"{path}: jobs[{i}]"
        merged = {**common, **job}
        if merged.get("dataset") not in READERS:
            raise ConfigError(f"{where}: dataset {merged.get('dataset')!r}; choose one of {', '.join(READERS)}")
        missing = [name for name in ("captions", "audio_dir", "out") if name not in merged]
        if missing:
            raise ConfigError(f"{where}: {', '.join(missing)} missing (in the job or in `common`)")
        try:
            cfg = from_dict(BuildConfig, merged, prefix=f"jobs[{i}]")
            cfg.resolved_split()
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if "://" not in cfg.captions and not Path(cfg.captions).is_file():
            raise ConfigError(f"{where}: captions file {cfg.captions} does not exist (relative to {Path.cwd()})")
        configs.append(cfg)
    sbert = {cfg.sbert for cfg in configs if cfg.sbert is not None}
    if sbert:  # a model that is not installed fails now, with the install command, before any job runs
        from relret.sbert import resolve_sbert

        for name in sorted(sbert):
            resolve_sbert(name)
    outputs = [(cfg.out, cfg.dataset, cfg.resolved_split()) for cfg in configs]
    twice = sorted({"/".join(o) for o in outputs if outputs.count(o) > 1})
    if twice:
        raise ConfigError(f"{path}: several jobs write {', '.join(twice)}; give them distinct `split` names")
    return Plan(configs)


def run_plan(plan: Plan, out=print) -> list[Any]:
    """Run the plan's jobs in one Ray session (started by the first job's connection settings); their manifests."""
    from shards.job import run, shared_embedders

    first = plan.jobs[0]
    connection = cluster.connect(first.ray_address, first.num_cpus, first.object_store_mb)
    manifests = []
    try:
        with shared_embedders():  # the Sentence-BERT model is loaded once for all jobs
            for i, cfg in enumerate(plan.jobs):
                out(f"[shards] {plan.label(i)}")
                try:
                    manifests.append(run(cfg))
                except (ValueError, RuntimeError) as exc:
                    raise RuntimeError(
                        f"{plan.label(i)} failed: {exc}\n(the jobs before it are complete; after fixing the cause run "
                        "the plan again: written shards are kept)"
                    ) from exc
    finally:
        connection.close()
    return manifests


def main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="shards/build.py --plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True, help="YAML file of shard jobs (e.g. configs/shards.yaml)")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.plan)
        run_plan(plan)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"[shards] the plan's {len(plan.jobs)} jobs are complete")
    return 0
