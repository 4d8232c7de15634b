"""The launcher without a cluster: its config, the sbatch command lines it builds, how it reads SLURM's answers, and
local mode (real deepspeed launcher, 2 CPU ranks, with tests/slurm_probe.py standing in for training)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launcher import pipeline, slurm, status
from launcher.config import REPO, PipelineConfig, Resources, StageConfig, load_pipeline
from relret.config import ConfigError
from relret.run_dir import Status

PROBE = REPO / "tests" / "kit" / "slurm_probe.py"


def chain(**stages: StageConfig) -> PipelineConfig:
    return PipelineConfig(run_root="/runs/p", stages=stages)


def test_shipped_pipeline_config_is_the_papers_chain():
    """configs/pipeline.yaml loads and orders shard -> pretrain -> both fine-tunings (from pretrain) -> evaluate."""
    cfg = load_pipeline(REPO / "configs" / "pipeline.yaml")
    assert cfg.order() == ["shard", "pretrain", "finetune_clotho", "finetune_audiocaps", "evaluate"]
    assert cfg.stages["finetune_clotho"].init_from == cfg.stages["finetune_audiocaps"].init_from == "pretrain"
    assert cfg.stages["evaluate"].parents == ["finetune_clotho", "finetune_audiocaps"]
    assert cfg.script("pretrain") == REPO / "slurm" / "pretrain.sh"
    assert cfg.script("finetune_clotho") == REPO / "slurm" / "finetune.sh"
    # No site-specific line that a cluster without that partition/account would reject.
    assert cfg.resources.partition is cfg.resources.account is cfg.resources.constraint is None


def test_order_puts_parents_first_and_keeps_config_order_otherwise():
    """Dependencies from `after` and `init_from` come first; independent stages keep the order they are written."""
    cfg = chain(
        evaluate=StageConfig(command=["true"], script="slurm/evaluate.sh", after=["ft_b", "ft_a"]),
        ft_a=StageConfig(config="a.yaml", init_from="pre"),
        ft_b=StageConfig(config="b.yaml", init_from="pre"),
        pre=StageConfig(config="p.yaml"),
    )
    assert cfg.order() == ["pre", "ft_b", "ft_a", "evaluate"]


@pytest.mark.parametrize(
    "stages, match",
    [
        (
            {"a": {}},
            r"stages.a: give either `config` \(a training stage\) or `command` \(any other stage\), not neither",
        ),
        ({"a": {"config": "c.yaml", "command": ["x"]}}, "not both"),
        (
            {"a": {"config": "c.yaml", "init_from": "pre"}},
            "stages.a: depends on unknown stage 'pre'; the stages are: a",
        ),
        ({"a": {"config": "c", "after": ["b"]}, "b": {"config": "c", "after": ["a"]}}, "dependency cycle a -> b -> a"),
        ({"a": {"command": ["x"]}}, "stages.a.script: a command stage needs its sbatch script"),
        ({"a": {"config": "c", "resources": {"gpus_per_node": 4, "ntasks_per_node": 2}}}, "one process per GPU"),
        ({"a": {"config": "c", "resources": {"nodes": 0}}}, "resources.nodes must be a positive integer, got 0"),
        ({"a": {"config": "c", "resourses": {}}}, "unknown key stages.a.resourses"),
    ],
)
def test_bad_pipeline_configs_are_refused_naming_the_key(tmp_path, stages, match):
    """Mistakes fail at load time with the stage and key named."""
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps({"stages": stages}))
    with pytest.raises(ConfigError, match=match):
        load_pipeline(path)


def test_sbatch_command_line_for_a_finetuning_stage(tmp_path, monkeypatch):
    """Resources merge stage over pipeline; GPUs give as many tasks per node; dependencies are afterok with
    kill-on-invalid-dep; training gets --config/--run-dir/--init-from and the overrides, pipeline's first."""
    monkeypatch.chdir(tmp_path)
    cfg = PipelineConfig(
        run_root="runs",
        overrides=["loss.name=infonce"],
        resources=Resources(partition="gpu", time="24:00:00", cpus_per_task=8, extra=["--exclusive"]),
        stages={
            "pre": StageConfig(config="configs/p.yaml"),
            "ft": StageConfig(
                config="configs/f.yaml",
                init_from="pre",
                overrides=["data.root={stages[pre]}/x"],
                resources=Resources(time="02:00:00", gpus_per_node=4, warning_s=120, extra=["--qos=high"]),
            ),
        },
    )
    assert pipeline.sbatch_args(cfg, "ft", ["11", "12"]) == [
        "--job-name=relret-ft",
        f"--output={tmp_path}/runs/logs/ft-%j.log",
        "--export=ALL",
        "--kill-on-invalid-dep=yes",
        "--dependency=afterok:11:12",
        "--partition=gpu",
        "--time=02:00:00",
        "--cpus-per-task=8",
        "--gpus-per-node=4",
        "--ntasks-per-node=4",
        "--signal=B:USR1@120",
        "--exclusive",
        "--qos=high",
        str(REPO / "slurm" / "finetune.sh"),
        "--config",
        f"{tmp_path}/configs/f.yaml",
        "--run-dir",
        f"{tmp_path}/runs/ft",
        "--init-from",
        f"{tmp_path}/runs/pre",
        "loss.name=infonce",
        f"data.root={tmp_path}/runs/pre/x",
    ]
    env = pipeline.stage_env(cfg, "ft")
    assert env["RELRET_TRAIN_SCRIPT"] == str(REPO / "relret" / "train.py")
    assert env["RELRET_MAX_RESTARTS"] == "10" and env["RELRET_ROOT"] == str(REPO)
    assert "RELRET_STATUS_DIR" not in env


def test_command_placeholders_are_filled_and_bad_ones_named():
    """{python}, {run_dir}, {stages[NAME]} are filled in commands and overrides, other braces kept; an unknown stage
    is named with the choices."""
    cfg = chain(
        pre=StageConfig(config="p.yaml", overrides=["data.train=[{path: {stages[pre]}/x}]", "a={b}"]),
        ev=StageConfig(command=["{python}", "-c", "{run_dir} {stages[pre]} {x}"], script="slurm/evaluate.sh"),
    )
    assert pipeline.stage_args(cfg, "ev") == [sys.executable, "-c", "/runs/p/ev /runs/p/pre {x}"]
    assert pipeline.stage_args(cfg, "pre")[-2:] == ["data.train=[{path: /runs/p/pre/x}]", "a={b}"]
    assert pipeline.stage_env(cfg, "ev")["RELRET_STATUS_DIR"] == "/runs/p/ev"
    bad = chain(ev=StageConfig(command=["{stages[nope]}"], script="slurm/evaluate.sh"))
    with pytest.raises(ConfigError, match=r"stages.ev.command: \{stages\[nope\]\} names no stage; the stages are: ev"):
        pipeline.stage_args(bad, "ev")


def test_missing_inputs_are_reported_before_anything_is_submitted(tmp_path, monkeypatch):
    """A missing training config, train script, or an init_from on a disabled unfinished stage: one error, all named."""
    monkeypatch.chdir(tmp_path)
    cfg = PipelineConfig(
        run_root="runs",
        train_script=str(tmp_path / "no_train.py"),
        stages={
            "pre": StageConfig(config="p.yaml", enabled=False),
            "ft": StageConfig(config="missing.yaml", init_from="pre"),
        },
    )
    with pytest.raises(ConfigError) as err:
        pipeline.submit_pipeline(cfg, dry_run=True, out=lambda line: None)
    message = str(err.value)
    assert f"train_script: {tmp_path}/no_train.py does not exist" in message
    assert f"stages.ft.config: missing.yaml is neither in {tmp_path} nor in the repository" in message
    assert f"stages.ft.init_from: stage 'pre' is disabled but {tmp_path}/runs/pre holds no completed run" in message
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_the_chain_and_skips_completed_stages(tmp_path, monkeypatch):
    """--dry-run writes nothing; a stage whose status.json says completed is not submitted and nobody waits for it."""
    monkeypatch.chdir(tmp_path)
    for name in ("p", "f"):
        (tmp_path / f"{name}.yaml").write_text("{}\n")
    cfg = PipelineConfig(
        run_root="runs",
        train_script=str(PROBE),
        stages={"pre": StageConfig(config="p.yaml"), "ft": StageConfig(config="f.yaml", init_from="pre")},
    )
    lines: list[str] = []
    assert pipeline.submit_pipeline(cfg, dry_run=True, out=lines.append) == {"pre": "<pre>", "ft": "<ft>"}
    assert "--dependency=afterok:<pre>" in lines[1]
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "pre").mkdir(parents=True)
    (tmp_path / "runs" / "pre" / "status.json").write_text('{"state": "completed", "step": 9}')
    lines.clear()
    assert pipeline.submit_pipeline(cfg, dry_run=True, out=lines.append) == {"ft": "<ft>"}
    assert lines[0].startswith("pre                  completed")
    assert "--dependency" not in lines[1]


def test_scontrol_and_jobcomp_lines_are_parsed():
    """Fields end at the next space; the parts the launcher reads come out as written."""
    line = (
        "JobId=10 JobName=relret-ft UserId=root(0) JobState=CANCELLED Reason=DependencyNeverSatisfied "
        "Dependency=afterok:9(failed) Requeue=1 Restarts=0 ExitCode=0:0 NodeList=(null)"
    )
    fields = slurm.parse_fields(line)
    assert (fields["JobState"], fields["Reason"], fields["Dependency"], fields["ExitCode"]) == (
        "CANCELLED",
        "DependencyNeverSatisfied",
        "afterok:9(failed)",
        "0:0",
    )
    assert slurm.JobInfo("10", "CANCELLED", reason="DependencyNeverSatisfied").cancelled_by_dependency
    assert not slurm.JobInfo("10", "CANCELLED").cancelled_by_dependency
    assert slurm.JobInfo("10", "REQUEUED").active and not slurm.JobInfo("10", "TIMEOUT").active


@pytest.mark.parametrize(
    "enabled, job, run, expected",
    [
        (True, slurm.JobInfo("1", "FAILED", exit_code="1:0"), Status("completed"), "completed"),
        (True, slurm.JobInfo("1", "RUNNING"), Status("running"), "running"),
        (True, slurm.JobInfo("1", "PENDING", reason="Dependency"), None, "pending"),
        (True, slurm.JobInfo("1", "CANCELLED", reason="DependencyNeverSatisfied"), None, "cancelled"),
        (True, slurm.JobInfo("1", "FAILED", exit_code="75:0"), Status("interrupted"), "interrupted"),
        (True, slurm.JobInfo("1", "TIMEOUT", exit_code="0:15"), Status("running"), "failed"),
        (True, None, None, "not submitted"),
        (False, None, None, "disabled"),
    ],
)
def test_status_word_combines_slurm_and_the_run_directory(enabled, job, run, expected):
    """status.json's "completed" wins; otherwise SLURM's state decides, with the run's own word for interruptions."""
    assert status._summary(enabled, job, run)[0] == expected


def test_launcher_does_not_import_training_internals():
    """`python -m launcher` loads relret's config home (relret.config and its registry) and the run-directory contract
    (relret.run_dir) only: no model, data, loss or DeepSpeed module."""
    code = "import sys, launcher.__main__; print(' '.join(sorted(m for m in sys.modules if m.startswith(('relret', 'deepspeed')))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["relret", "relret.compat", "relret.config", "relret.registry", "relret.run_dir"]


def test_status_without_a_pipeline_names_the_problem(tmp_path):
    """`launcher status` on a directory that is no run root fails with exit 2 and says what it looked for."""
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "status", str(tmp_path)], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 2
    assert f"{tmp_path}/pipeline.json does not exist" in proc.stderr


@pytest.mark.distributed
def test_local_mode_runs_the_stages_in_order_on_two_deepspeed_ranks(tmp_path, monkeypatch):
    """--local: pretrain then fine-tune, each through the real deepspeed launcher on 2 CPU ranks with a gloo
    all_reduce; the fine-tune gets --init-from the pretrain run; a second run skips both; a failure stops the chain."""
    monkeypatch.chdir(tmp_path)
    for name in ("p", "f"):
        (tmp_path / f"{name}.yaml").write_text("{}\n")
    config = {
        "run_root": "runs",
        "train_script": str(PROBE),
        "overrides": ["collective=1"],
        "stages": {
            "pretrain": {"config": "p.yaml"},
            "finetune": {"config": "f.yaml", "init_from": "pretrain"},
            "evaluate": {"command": ["touch", "{run_dir}/done"], "script": "slurm/evaluate.sh", "after": ["finetune"]},
        },
    }
    (tmp_path / "pipeline.yaml").write_text(json.dumps(config))
    cli = [sys.executable, "-m", "launcher", "pipeline", "--local", "--config", "pipeline.yaml"]
    first = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    runs = tmp_path / "runs"
    for name in ("pretrain", "finetune"):
        records = sorted(
            (json.loads(x) for x in (runs / name / "probe.jsonl").read_text().splitlines()), key=lambda r: r["rank"]
        )
        assert [(r["rank"], r["world_size"], r["sum"]) for r in records] == [(0, 2, 3.0), (1, 2, 3.0)]
        assert {r["master_addr"] for r in records} == {"127.0.0.1"}
    assert {json.loads(x)["init_from"] for x in (runs / "finetune" / "probe.jsonl").read_text().splitlines()} == {
        str(runs / "pretrain")
    }
    assert (runs / "evaluate" / "done").is_file()
    assert json.loads((runs / "evaluate" / "status.json").read_text())["state"] == "completed"

    second = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0
    assert [line.split(" ", 1)[1] for line in second.stdout.splitlines()] == [
        f"completed in {runs / name}; skipped" for name in ("pretrain", "finetune", "evaluate")
    ]

    failing = subprocess.run(
        [*cli, "run_root=runs2", "stages.pretrain.overrides=[mode=fail, exit_code=5]"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failing.returncode == 5
    assert "[pretrain] failed with exit code 5; the stages after it were not run" in failing.stdout
    assert not (tmp_path / "runs2" / "finetune").exists()


def test_dry_run_refuses_a_typo_in_one_stages_override_naming_stage_and_key(tmp_path):
    """A typo in one training stage's override fails `launcher pipeline --dry-run` before anything is submitted,
    naming the stage and the key; the same pipeline without the typo passes the check."""
    typo = "stages.finetune_clotho.overrides=[train.epochz=3]"
    cmd = [sys.executable, "-m", "launcher", "pipeline", "--config", "configs/pipeline.yaml", "--dry-run"]
    cmd += [f"run_root={tmp_path / 'runs'}"]
    bad = subprocess.run([*cmd, typo], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2, bad.stderr
    assert "stages.finetune_clotho: its training config does not load" in bad.stderr
    assert "unknown key train.epochz" in bad.stderr
    assert "sbatch" not in bad.stdout and not (tmp_path / "runs").exists()
    good = subprocess.run([*cmd, "stages.finetune_clotho.overrides=[train.epochs=3]"], capture_output=True,
                          text=True, cwd=REPO)  # fmt: skip
    assert "stages.finetune_clotho" not in good.stderr, good.stderr


def test_stages_whose_shards_would_not_do_are_refused_before_submission(tmp_path):
    """Shards that exist already are checked against each training stage before anything is submitted: fewer shards
    than ranks x data.num_workers, or Sentence-BERT vectors of another dimension, are refused naming the stage."""
    from kit.shards import write_shard_dir

    write_shard_dir(tmp_path / "shards", n_clips=16, per_shard=4)  # 4 shards, 384-d
    cmd = [sys.executable, "-m", "launcher", "pipeline", "--config", "configs/pipeline.yaml", "--dry-run"]
    cmd += [f"run_root={tmp_path / 'runs'}", "stages.finetune_audiocaps.enabled=false"]
    cmd += ["stages.pretrain.enabled=false", f"stages.pretrain.run_dir={tmp_path / 'done'}"]
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "status.json").write_text('{"state": "completed"}')
    train = f"data.train=[{{path: {tmp_path / 'shards'}}}]"

    def run(*overrides: str) -> subprocess.CompletedProcess:
        stage = f"stages.finetune_clotho.overrides={json.dumps([train, *overrides])}"
        return subprocess.run([*cmd, stage], capture_output=True, text=True, cwd=REPO)

    few = run("data.sbert_dim=384")
    assert few.returncode == 2, few.stderr
    assert "stages.finetune_clotho: 4 training shard(s) for 4 rank(s) x 12 worker(s) = 48 readers" in few.stderr
    dim = run("data.sbert_dim=768", "data.num_workers=1")
    assert dim.returncode == 2 and "data.sbert_dim=768 but" in dim.stderr and "384-dimensional" in dim.stderr
    ok = run("data.sbert_dim=384", "data.num_workers=1")
    assert "stages.finetune_clotho" not in ok.stderr, ok.stderr


def test_training_configs_come_from_the_launch_directory_else_the_repository(tmp_path, monkeypatch):
    """Launched from the data root, the shipped pipeline finds the shipped training configs; a config of the same name
    in the launch directory is preferred."""
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline(REPO / "configs" / "pipeline.yaml")
    assert cfg.train_config("pretrain") == REPO / "configs" / "pretrain.yaml"
    assert pipeline.stage_args(cfg, "finetune_clotho")[1] == str(REPO / "configs" / "finetune_clotho.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "pretrain.yaml").write_text("base: /dev/null\n")
    assert cfg.train_config("pretrain") == tmp_path / "configs" / "pretrain.yaml"
