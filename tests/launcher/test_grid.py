"""The experiment grid (launcher/grid.py): configs/paper.yaml expands to the paper's jobs and dependencies, names
that collide are refused, a batch-size axis applies its learning-rate rule, and a changed config is refused before
submission."""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys

import pytest

from launcher import pipeline
from launcher.config import REPO, PipelineConfig, StageConfig, load_pipeline
from launcher.grid import Axis, AxisLabel
from relret.config import ConfigError, TrainConfig, dump_yaml, load_config

METHODS = {
    "infonce": ["loss.name=infonce"],
    "listnet_audio": ["loss.name=listnet", "loss.direction=t2a"],
    "listnet_text": ["loss.name=listnet", "loss.direction=a2t"],
    "listnet_both": ["loss.name=listnet", "loss.direction=both"],
}
SEEDS = range(5)
DATASETS = {"clotho": "data/shards/clotho/evaluation", "audiocaps": "data/shards/audiocaps/test"}
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def test_paper_grid_expands_to_table2_table3_and_the_ablation():
    """configs/paper.yaml: 1 shard + Table II 2x4x5 trainings and evaluations + Table III 2x5 pretrainings, 2x2x5
    fine-tunings (each from its method and seed's pretraining) and evaluations + ablation 5 + 5 + 1 tables = 142 jobs,
    with the overrides, configs, commands and dependencies written out here by hand."""
    cfg = load_pipeline(REPO / "configs" / "paper.yaml")
    stages = cfg.stages
    expected: dict[str, dict] = {"shard": {}}
    for d, m, s in itertools.product(DATASETS, METHODS, SEEDS):
        expected[f"t2_{d}_{m}_s{s}"] = {
            "config": f"configs/finetune_{d}.yaml",
            "overrides": [*METHODS[m], f"train.seed={s}"],
            "after": ["shard"],
            "init_from": None,
        }
        expected[f"eval_t2_{d}_{m}_s{s}"] = {"after": [f"t2_{d}_{m}_s{s}"]}
    for m, s in itertools.product(["infonce", "listnet_audio"], SEEDS):
        expected[f"pretrain_{m}_s{s}"] = {
            "config": "configs/pretrain.yaml",
            "overrides": [*METHODS[m], f"train.seed={s}"],
            "after": ["shard"],
            "init_from": None,
        }
    for d, m, s in itertools.product(DATASETS, ["infonce", "listnet_audio"], SEEDS):
        expected[f"t3_{d}_{m}_s{s}"] = {
            "config": f"configs/finetune_{d}.yaml",
            "overrides": [*METHODS[m], f"train.seed={s}"],
            "after": [],
            "init_from": f"pretrain_{m}_s{s}",
        }
        expected[f"eval_t3_{d}_{m}_s{s}"] = {"after": [f"t3_{d}_{m}_s{s}"]}
    for s in SEEDS:
        expected[f"ablation_minmax_clotho_listnet_audio_s{s}"] = {
            "config": "configs/finetune_clotho.yaml",
            "overrides": [*METHODS["listnet_audio"], f"train.seed={s}", "loss.listnet.relevance.fn=minmax"],
            "after": ["shard"],
            "init_from": None,
        }
        expected[f"eval_ablation_minmax_clotho_listnet_audio_s{s}"] = {
            "after": [f"ablation_minmax_clotho_listnet_audio_s{s}"]
        }
    evaluations = sorted(n for n in expected if n.startswith("eval_"))
    expected["tables"] = {"after": evaluations}

    assert len(expected) == 1 + (40 + 40) + (10 + 20 + 20) + (5 + 5) + 1 == 142
    assert set(stages) == set(expected) and len(cfg.order()) == 142
    for name, want in expected.items():
        stage = stages[name]
        for key, value in want.items():
            got = sorted(stage.after) if key == "after" and name == "tables" else getattr(stage, key)
            assert got == value, (name, key)
    assert sum(s.kind == "train" for s in stages.values()) == 40 + 10 + 20 + 5
    # one pretraining per method and seed feeds both fine-tunings
    for m, s in itertools.product(["infonce", "listnet_audio"], SEEDS):
        assert sorted(n for n, st in stages.items() if st.init_from == f"pretrain_{m}_s{s}") == [
            f"t3_audiocaps_{m}_s{s}",
            f"t3_clotho_{m}_s{s}",
        ]
    # each evaluation reads its own model and its dataset's evaluation split, and writes the layout paper-tables reads
    for table, d, m, s in [("t2", "audiocaps", "listnet_both", 4), ("t3", "clotho", "infonce", 2)]:
        command = stages[f"eval_{table}_{d}_{m}_s{s}"].command
        assert command[command.index("--model") + 1] == f"{{stages[{table}_{d}_{m}_s{s}]}}"
        assert command[command.index("--shards") + 1] == DATASETS[d]
        assert command[command.index("--out") + 1] == f"{{run_root}}/results/table{table[1]}/{d}/{m}/s{s}"
    ablation = stages["eval_ablation_minmax_clotho_listnet_audio_s3"].command
    assert ablation[ablation.index("--out") + 1] == "{run_root}/results/ablation/clotho/listnet_audio_minmax/s3"
    assert stages["tables"].command[3:6] == ["paper-tables", "--results", "{run_root}/results"]
    assert cfg.expanded_from["t3_clotho_infonce_s0"] == "t3_{dataset}_{method}_s{seed}"
    assert cfg.expanded_from["shard"] == "shard"


def test_paper_dry_run_prints_the_plan_with_a_stated_estimate(tmp_path):
    """`launcher pipeline --config configs/paper.yaml --dry-run`: 142 sbatch lines with afterok chains, the plan's job
    count, and GPU-hours equal to the FLOP formula worked out here by hand; nothing is written."""
    cmd = [sys.executable, "-m", "launcher", "pipeline", "--config", "configs/paper.yaml", "--dry-run"]
    proc = subprocess.run([*cmd, f"run_root={tmp_path / 'runs'}"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    sbatch = [line for line in lines if " sbatch " in line]
    assert len(sbatch) == 142
    t3 = next(line for line in sbatch if line.startswith("t3_clotho_listnet_audio_s1 "))
    assert "--dependency=afterok:<pretrain_listnet_audio_s1>" in t3
    assert f"--init-from {tmp_path}/runs/pretrain_listnet_audio_s1" in t3
    assert "Plan: 142 jobs (75 training, 67 other) from 9 stage templates; 142 to run, 0 completed." in lines
    assert not (tmp_path / "runs").exists()

    # By hand: a sample is a clip or a caption (data.epoch_unit); TFLOP per sample = windows x kept x 0.27 + 0.07 with
    # kept the share of PaSST's 8 x 62 patch grid that structured patchout keeps; each epoch's validation costs
    # (clips x windows x 0.27 + captions x 0.07) / 3; GPU-hours = TFLOP / (0.35 x 989) / 3600. The counts are
    # configs/paper.yaml's (clips, captions); the training settings come from the configs, which others may tune.
    def hours(config: str, train: list[tuple[int, int]], val: tuple[int, int]) -> float:
        c = load_config(TrainConfig, REPO / "configs" / config)
        audio = c.model.audio
        kept = (8 - audio.s_patchout_f) * ((audio.input_tdim - 16) // 16 + 1 - audio.s_patchout_t)
        kept /= 8 * ((audio.input_tdim - 16) // 16 + 1)
        by_caption = getattr(c.data, "epoch_unit", "clip") == "caption"
        per_epoch = sum(captions if by_caption else clips for clips, captions in train)
        windows = math.ceil(c.data.crop_s / 10)
        tflop = c.train.epochs * per_epoch * (windows * kept * 0.27 + 0.07)
        tflop += c.train.epochs * (val[0] * math.ceil(c.data.val_crop_s / 10) * 0.27 + val[1] * 0.07) / 3
        return tflop / (0.35 * 989) / 3600

    clotho = hours("finetune_clotho.yaml", [(3839, 19195)], (1045, 5225))
    audiocaps = hours("finetune_audiocaps.yaml", [(49838, 49838)], (495, 2475))
    wavcaps = [(n, n) for n in (262300, 31201, 1232, 108317)]
    pretrain = hours("pretrain.yaml", [*wavcaps, (49838, 49838), (3839, 19195)], (1045, 5225))
    total = 20 * clotho + 20 * audiocaps + 10 * pretrain + 10 * clotho + 10 * audiocaps + 5 * clotho
    assert (
        f"Estimated GPU-hours: {total:.1f} for every training job, {total:.1f} for those not completed" in proc.stdout
    )
    row = next(line for line in lines if line.startswith("pretrain_{method}_s{seed}"))
    assert row.split() == ["pretrain_{method}_s{seed}", "10", "8", f"{pretrain:.2f}", f"{10 * pretrain:.1f}",
                           f"{pretrain / 8:.2f}"]  # fmt: skip
    assert "This is an estimate, not a measurement" in proc.stdout and "MFU 0.35" in proc.stdout


def _grid_config(stages: dict, grid: dict, run_root: str = "/runs/g") -> PipelineConfig:
    """A pipeline config loaded as from YAML (the same machinery: dotted overrides with JSON values)."""
    overrides = [f"run_root={run_root}", f"stages={json.dumps(stages)}", f"grid={json.dumps(grid)}"]
    return load_config(PipelineConfig, None, overrides)


def test_colliding_expanded_names_are_refused_naming_both():
    """Two templates, or two label combinations of one template, that give the same stage name: refused, naming both."""
    grid = {"a": {"labels": {"x": [], "y": []}}}
    with pytest.raises(ConfigError, match=r"'p_\{a\}' \(a=x\) and 'p_x' both expand to 'p_x'; rename one"):
        _grid_config({"p_{a}": {"config": TINY}, "p_x": {"config": TINY}}, grid)
    digits = {"a": {"key": "train.seed", "values": [1, 11]}, "b": {"key": "train.epochs", "values": [1, 11]}}
    with pytest.raises(ConfigError, match=r"'p\{a\}\{b\}' \(a=1, b=11\) and 'p\{a\}\{b\}' \(a=11, b=1\) both expand"):
        _grid_config({"p{a}{b}": {"config": TINY}}, digits)


@pytest.mark.parametrize(
    "scaling, factor",
    [("none", None), ("linear", lambda b: b / 32), ("sqrt", lambda b: math.sqrt(b / 32))],
)
def test_batch_size_axis_expands_with_the_chosen_learning_rate_rule(scaling, factor):
    """Any training key can be an axis: train.global_batch_size over [32, 256, 1024] gives three stages whose batch is
    set, and with a rule optim.lr = 2e-5 x (B/32) or x sqrt(B/32), applied after the stage's own overrides (so it
    wins); with none the learning rate is left alone. The overrides load as relret/train.py loads them."""
    axis = {"key": "train.global_batch_size", "values": [32, 256, 1024], "lr_scaling": scaling}
    if scaling != "none":
        axis.update(lr_reference_batch=32, lr_reference=2.0e-5)
    cfg = _grid_config({"b{batch}": {"config": TINY, "overrides": ["optim.lr=0.5"]}}, {"batch": axis})
    assert list(cfg.stages) == ["b32", "b256", "b1024"]
    for batch in (32, 256, 1024):
        overrides = cfg.stages[f"b{batch}"].overrides
        assert overrides[:2] == [f"train.global_batch_size={batch}", "optim.lr=0.5"]
        train = load_config(TrainConfig, TINY, overrides)
        assert train.train.global_batch_size == batch
        if factor is None:
            assert len(overrides) == 2 and train.optim.lr == 0.5
        else:
            assert len(overrides) == 3 and train.optim.lr == pytest.approx(2.0e-5 * factor(batch), rel=1e-12)
            assert train.optim.min_lr == load_config(TrainConfig, TINY).optim.min_lr


@pytest.mark.parametrize(
    "stages, grid, match",
    [
        ({"p_{nope}": {"config": TINY}}, {"a": {"labels": {"x": []}}}, r"\{nope\} in the name is no axis; the axes are: a"),
        ({"p": {"command": ["echo", "{a}"], "script": "slurm/evaluate.sh"}}, {"a": {"labels": {"x": []}}},
         r"stages.p.command: \{a\} names axis 'a', which this stage does not vary over"),
        ({"p_{a}": {"config": TINY, "only": {"a": ["z"]}}}, {"a": {"labels": {"x": []}}},
         r"stages.p_\{a\}.only.a: z; the labels of a are: x"),
        ({"p": {"command": ["true"], "script": "s", "after": ["q_{a}"]}}, {"a": {"labels": {"x": []}}},
         r"stages.p.after: 'q_\{a\}' matches no stage"),
        ({"p_{a}": {"config": TINY, "init_from": "q_{b}"}, "q_{b}": {"config": TINY}},
         {"a": {"labels": {"x": []}}, "b": {"labels": {"y": []}}}, r"stages.p_\{a\}.init_from: \{b\} names axis 'b'"),
        ({"p_{a}": {"config": TINY}}, {"a": {"key": "train.seed", "values": [0], "lr_scaling": "sqrt"}},
         r"grid.a.lr_scaling: .* must be train.global_batch_size, not train.seed"),
        ({"p_{a}": {"config": TINY}}, {"a": {"key": "train.global_batch_size", "values": [8], "lr_scaling": "linear"}},
         r"grid.a: lr_scaling=linear needs lr_reference_batch"),
        ({"p_{run_dir}": {"config": TINY}}, {"run_dir": {"labels": {"x": []}}}, r"grid.run_dir: an axis name must be"),
        ({"p_{a}": {"config": TINY}}, {"a": {"labels": {"x": []}, "key": "train.seed", "values": [1]}},
         r"grid.a: give either `labels`"),
        ({"p_{a}": {"command": ["{a.eval}"], "script": "s"}}, {"a": {"labels": {"x": {"vars": {"e": "1"}}}}},
         r"\{a.eval\}: label 'x' of a has no var 'eval': e"),
    ],
)  # fmt: skip
def test_grid_mistakes_are_refused_naming_the_key(stages, grid, match):
    """Unknown axes, placeholders of axes a stage does not vary over, unknown labels, empty fan-ins, incomplete lr rules
    and reserved names fail at load time, naming the stage or axis."""
    with pytest.raises(ConfigError, match=match):
        _grid_config(stages, grid)


def test_fan_in_vars_and_shared_stages():
    """A shared stage's `after` with placeholders waits for every expansion; {axis.var} fills a label's string; a
    stage without placeholders stays one stage; axes and labels typed in Python work like YAML."""
    cfg = PipelineConfig(
        run_root="/runs/g",
        grid={"d": Axis(labels={"c": AxisLabel(vars={"eval": "shards/c"}), "a": ["x=1"]}), "s": Axis(key="k", values=[0, 1])},
        stages={
            "prep": StageConfig(command=["true"], script="s"),
            "ev_{d}_{s}": StageConfig(command=["ls", "{d.eval}"], script="s", after=["prep"], only={"d": ["c"]}),
            "all": StageConfig(command=["true"], script="s", after=["ev_{d}_{s}", "prep"]),
        },
    )  # fmt: skip
    assert list(cfg.stages) == ["prep", "ev_c_0", "ev_c_1", "all"]
    assert cfg.stages["ev_c_1"].command == ["ls", "shards/c"] and cfg.stages["ev_c_1"].after == ["prep"]
    assert cfg.stages["all"].after == ["ev_c_0", "ev_c_1", "prep"]
    assert cfg.order() == ["prep", "ev_c_0", "ev_c_1", "all"]


def _completed_run(run_dir, overrides):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(load_config(TrainConfig, TINY, overrides)))
    (run_dir / "status.json").write_text('{"state": "completed", "step": 12}')


def test_rerun_after_a_config_change_is_refused_naming_the_keys(tmp_path, monkeypatch):
    """A completed (or checkpointed) stage whose saved config.yaml differs from what the pipeline now asks is refused
    before anything is submitted, naming the stage and the keys, as training refuses such a resume; the same config
    passes (the completed stage is skipped) and so do keys that may change on resume; a run that never checkpointed
    is not refused."""
    monkeypatch.chdir(tmp_path)
    grid = {"seed": {"key": "train.seed", "values": [0, 1]}}
    stages = {"t_s{seed}": {"config": TINY, "overrides": ["train.epochs=1"]}}
    _completed_run(tmp_path / "runs" / "t_s0", ["train.seed=0", "train.epochs=1"])
    cfg = _grid_config(stages, grid, run_root="runs")
    lines: list[str] = []
    assert pipeline.submit_pipeline(cfg, dry_run=True, out=lines.append) == {"t_s1": "<t_s1>"}
    assert lines[0].startswith("t_s0                 completed")

    changed = {"t_s{seed}": {"config": TINY, "overrides": ["train.epochs=2", "optim.lr=0.01", "data.num_workers=0"]}}
    cfg = _grid_config(changed, grid, run_root="runs")
    with pytest.raises(ConfigError) as err:
        pipeline.submit_pipeline(cfg, dry_run=True, out=lines.append)
    message = str(err.value)
    assert re.search(r"stages.t_s0: run directory .*/runs/t_s0 was started with another config .*; differing keys: "
                     r"optim.lr, train.epochs\. Use a new run_root", message)  # fmt: skip
    assert "t_s1" not in message  # never started: nothing to compare

    (tmp_path / "runs" / "t_s0" / "status.json").write_text('{"state": "running", "step": 0}')
    pipeline.submit_pipeline(cfg, dry_run=True, out=lines.append)  # started, never checkpointed: training starts afresh


def test_batch_study_dry_run_expands_batch_method_and_seed_with_the_sqrt_lr_rule(tmp_path):
    """`launcher pipeline --config configs/batch_study.yaml --dry-run`: 3 batch sizes x 2 methods x 5 seeds training
    jobs at optim.lr = 2e-5 x sqrt(B / 32), an evaluation per run into one paper-tables layout per batch size, one
    tables job per batch size waiting for exactly its 10 evaluations, and relevance-stats at the grid's batch sizes;
    nothing is written."""
    cmd = [sys.executable, "-m", "launcher", "pipeline", "--config", "configs/batch_study.yaml", "--dry-run"]
    proc = subprocess.run([*cmd, f"run_root={tmp_path / 'runs'}"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    jobs = {line.split()[0]: line for line in proc.stdout.splitlines() if " sbatch " in line}
    batches, methods = (32, 256, 1024), {"infonce": "loss.name=infonce", "listnet_audio": "loss.direction=t2a"}
    trains = [f"train_b{b}_{m}_s{s}" for b, m, s in itertools.product(batches, methods, SEEDS)]
    evals = [name.replace("train_", "eval_") for name in trains]
    assert list(jobs) == ["shard", "relevance_stats", *trains, *evals, *(f"tables_b{b}" for b in batches)]
    assert "Plan: 65 jobs (30 training, 35 other) from 5 stage templates; 65 to run, 0 completed." in proc.stdout
    for batch, method, seed in itertools.product(batches, methods, SEEDS):
        line = jobs[f"train_b{batch}_{method}_s{seed}"]
        assert "'--dependency=afterok:<shard>' " in line and " --nodes=2 " in line and " --gpus-per-node=4 " in line
        args = line.split()
        assert {f"train.global_batch_size={batch}", methods[method], f"train.seed={seed}"} <= set(args)
        (lr,) = [a for a in args if a.startswith("optim.lr=")]
        assert float(lr.split("=")[1]) == pytest.approx(2e-5 * math.sqrt(batch / 32), rel=1e-12)
        out = tmp_path / "runs" / "results" / f"b{batch}" / "table2" / "clotho" / method / f"s{seed}"
        assert f"--out {out} " in jobs[f"eval_b{batch}_{method}_s{seed}"]
    for batch in batches:
        tables = jobs[f"tables_b{batch}"]
        waits = re.search(r"--dependency=afterok:(\S+)'", tables).group(1).split(":")
        assert sorted(waits) == sorted(f"<eval_b{batch}_{m}_s{s}>" for m in methods for s in SEEDS)
        assert f"paper-tables --results {tmp_path / 'runs' / 'results' / f'b{batch}'} " in tables
    stats = jobs["relevance_stats"]
    assert "relevance-stats --shards data/shards/clotho/development --batch-sizes 32,256,1024 " in stats
    assert not (tmp_path / "runs").exists()
