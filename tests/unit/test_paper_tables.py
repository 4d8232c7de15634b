"""`python -m relret paper-tables` (relret/paper.py): the tables and the paper's t-test against hand-computed values
from synthetic eval.json files, and a small rehearsal of the paper grid through the launcher's local mode."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from kit import REPO
from kit.shards import write_shard_dir
from scipy import stats

from relret.__main__ import main as relret_main
from relret.results import EvalResult

METRICS = ("mAP@10", "R@1", "R@5", "R@10")
T2A_IDS = [f"{clip}:{i}" for clip in (3, 8, 11) for i in range(2)]  # 6 text queries
A2T_IDS = ["3", "8", "11"]


def _result(rng: np.random.Generator, shift: float, shuffle: bool) -> EvalResult:
    """A result with random per-query values (AP@10 raised by `shift`), queries optionally listed in another order."""
    per_query, ids = {}, {"t2a": list(T2A_IDS), "a2t": list(A2T_IDS)}
    if shuffle:
        ids = {d: [q[i] for i in rng.permutation(len(q))] for d, q in ids.items()}
    for d, queries in ids.items():
        per_query[d] = {"AP@10": np.clip(rng.uniform(0, 0.8, len(queries)) + shift, 0, 1).tolist()}
        for k in (1, 5, 10):
            per_query[d][f"R@{k}"] = rng.uniform(0, 1, len(queries)).tolist()
    metrics = {d: {m: float(np.mean(per_query[d]["AP@10" if m == "mAP@10" else m])) for m in METRICS} for d in ids}
    return EvalResult(metrics=metrics, per_query=per_query, query_ids=ids, info={"name": "synthetic"})


def _write_results(root, table: str, dataset: str, methods: dict[str, float], seeds: int = 3, seed: int = 0) -> dict:
    """eval.json files (EvalResult's own writer) under root/TABLE/DATASET/METHOD/sN; returns the results by method."""
    rng = np.random.default_rng(seed)
    out = {}
    for method, shift in methods.items():
        out[method] = []
        for s in range(seeds):
            result = _result(rng, shift, shuffle=s % 2 == 1)
            path = root / table / dataset / method / f"s{s}"
            path.mkdir(parents=True)
            (path / "eval.json").write_text(result.to_json())
            out[method].append(result)
    return out


def _hand_averaged_ap(results: list[EvalResult]) -> dict[str, float]:
    """Per text query id: AP@10 averaged over the runs, by explicit lookups."""
    averaged = {}
    for query in T2A_IDS:
        values = [r.per_query["t2a"]["AP@10"][r.query_ids["t2a"].index(query)] for r in results]
        averaged[query] = sum(values) / len(values)
    return averaged


def test_tables_and_ttest_equal_hand_values_and_scipy(tmp_path):
    """Each cell is the mean and sample sd over seeds of the runs' metric; the t-test is scipy's ttest_rel on AP@10
    averaged per query over each method's runs (queries paired by id, not position), reported as t(df = queries - 1);
    the paper's t(df) stands beside it; rows without runs say so; the ablation reuses Table II's ListNet_audio runs as
    its logistic arm; a PNG is written."""
    root = tmp_path / "results"
    runs = _write_results(root, "table2", "clotho", {"infonce": 0.0, "listnet_audio": 0.15, "listnet_text": 0.05})
    out = tmp_path / "tables"
    assert relret_main(["paper-tables", "--results", str(root), "--out", str(out)]) == 0
    data = json.loads((out / "paper_tables.json").read_text())
    # the ablation's logistic arm is Table II's ListNet_audio on Clotho; its min-max arm has no runs here
    assert list(data["tables"]) == ["table2", "ablation"] and list(data["tables"]["table2"]["datasets"]) == ["clotho"]
    ablation = data["tables"]["ablation"]["datasets"]["clotho"]
    assert ablation["rows"]["min-max"]["summary"] is None and ablation["ttests"][0]["missing"] == ["min-max"]
    block = data["tables"]["table2"]["datasets"]["clotho"]
    assert ablation["rows"]["logistic"]["summary"]["t2a"] == block["rows"]["ListNet_audio"]["summary"]["t2a"]
    names = {"InfoNCE": "infonce", "ListNet_audio": "listnet_audio", "ListNet_text": "listnet_text"}
    for row, method in names.items():
        for d in ("t2a", "a2t"):
            for m in METRICS:
                values = [r.metrics[d][m] for r in runs[method]]
                cell = block["rows"][row]["summary"][d][m]
                assert cell["mean"] == pytest.approx(np.mean(values), abs=1e-12)
                assert cell["sd"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    assert block["rows"]["ListNet_audio+text"]["summary"] is None

    a = _hand_averaged_ap(runs["listnet_audio"])
    b = _hand_averaged_ap(runs["infonce"])
    ref = stats.ttest_rel([a[q] for q in T2A_IDS], [b[q] for q in T2A_IDS])
    (test,) = block["ttests"]
    assert (test["a"], test["b"], test["n"], test["df"], test["runs_a"], test["runs_b"]) == (
        "ListNet_audio",
        "InfoNCE",
        6,
        5,
        3,
        3,
    )
    assert test["t"] == pytest.approx(ref.statistic, rel=1e-12) and test["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert test["published"] == {"df": 5224, "t": 11.658}

    text = (out / "paper_tables.md").read_text()
    infonce = block["rows"]["InfoNCE"]["summary"]["t2a"]["mAP@10"]
    assert f"| InfoNCE | 3 | {100 * infonce['mean']:.2f} ± {100 * infonce['sd']:.2f} |" in text
    assert f"t(5) = {ref.statistic:.3f}, p = {ref.pvalue:.3g}" in text and "Paper: t(5224) = 11.658." in text
    assert "| ListNet_audio+text | no runs | — |" in text
    assert (out / "paper_tables.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_published_values_stand_beside_ours_with_the_difference(tmp_path):
    """--published FILE adds the paper's row under ours and ours - paper in percentage points; its t-test replaces the
    built-in one; an unknown row in the file is refused."""
    root = tmp_path / "results"
    runs = _write_results(root, "table3", "audiocaps", {"infonce": 0.0, "listnet_audio": 0.1}, seeds=2)
    published = tmp_path / "paper.yaml"
    published.write_text(yaml.safe_dump({"table3": {"audiocaps": {"rows": {"InfoNCE": {"t2a": {"mAP@10": 40.0}}},
                                                                  "ttest": {"df": 4699, "t": 2.601, "p": 0.0093}}}}))  # fmt: skip
    out = tmp_path / "tables"
    argv = ["paper-tables", "--results", str(root), "--out", str(out), "--published", str(published)]
    assert relret_main(argv) == 0
    text = (out / "paper_tables.md").read_text()
    ours = 100 * np.mean([r.metrics["t2a"]["mAP@10"] for r in runs["infonce"]])
    assert "| InfoNCE (paper) |  | 40.00 | — | — | — |" in text
    assert f"| InfoNCE (ours − paper) |  | {ours - 40.0:+.2f} | — | — | — |" in text
    assert "Paper: t(4699) = 2.601, p = 0.0093." in text

    published.write_text(yaml.safe_dump({"table3": {"audiocaps": {"rows": {"ListNet_text": {}}}}}))
    argv[4] = str(tmp_path / "other")
    assert relret_main(argv) == 2


def test_refusals_name_the_problem(tmp_path, capsys):
    """No results, runs on different queries, the same seed twice and a foreign --out are refused with exit 2."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert relret_main(["paper-tables", "--results", str(empty), "--out", str(tmp_path / "o1")]) == 2
    assert "no evaluation results laid out as TABLE/DATASET/METHOD/SEED/eval.json" in capsys.readouterr().err

    root = tmp_path / "results"
    runs = _write_results(root, "table2", "clotho", {"infonce": 0.0, "listnet_audio": 0.1}, seeds=2)
    shorter = runs["infonce"][1]
    shorter.query_ids["t2a"] = shorter.query_ids["t2a"][:-1]
    shorter.per_query["t2a"] = {k: v[:-1] for k, v in shorter.per_query["t2a"].items()}
    (root / "table2" / "clotho" / "infonce" / "s1" / "eval.json").write_text(shorter.to_json())
    assert relret_main(["paper-tables", "--results", str(root), "--out", str(tmp_path / "o2")]) == 2
    assert "different t2a queries" in capsys.readouterr().err

    twice = tmp_path / "twice"
    _write_results(twice, "table2", "clotho", {"infonce": 0.0}, seeds=1)
    assert relret_main(["paper-tables", "--results", str(root), str(twice), "--out", str(tmp_path / "o3")]) == 2
    assert "two results for table2/clotho/infonce/s0" in capsys.readouterr().err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert relret_main(["paper-tables", "--results", str(twice), "--out", str(foreign)]) == 2
    assert "is not a previous paper tables" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


@pytest.mark.slow
@pytest.mark.distributed
def test_rehearsal_of_the_paper_grid_through_local_mode(tmp_path):
    """2 methods x 2 seeds on one synthetic dataset through `launcher pipeline --local` (the tiny CPU model, 1 rank):
    train, evaluate into the results layout, tables with the t-test equal to scipy on the evaluations' per-query AP@10
    averaged by hand; a second submission skips every stage; a changed training key is refused, naming it."""
    shards = tmp_path / "shards"
    write_shard_dir(shards / "train", n_clips=32, per_shard=8, durations_s=(1.5, 3.0, 5.0), seed=1)
    write_shard_dir(shards / "val", split="val", n_clips=8, per_shard=8, seed=2)
    write_shard_dir(shards / "eval", split="evaluation", n_clips=12, per_shard=12, seed=3)
    train = "t2_clotho_{method}_s{seed}"
    config = {
        "run_root": str(tmp_path / "runs"),
        "local_ranks": 1,
        "grid": {
            "method": {"labels": {"infonce": ["loss.name=infonce"], "listnet_audio": ["loss.name=listnet"]}},
            "seed": {"key": "train.seed", "values": [0, 1]},
        },
        "stages": {
            train: {
                "config": str(REPO / "configs" / "tiny_cpu.yaml"),
                "overrides": [f"data.train=[{{path: {shards / 'train'}}}]", f"data.val=[{shards / 'val'}]",
                              "train.epochs=1", "data.num_workers=0"],
            },
            "eval_" + train: {
                "script": "slurm/evaluate.sh",
                "after": [train],
                "command": ["{python}", "-m", "relret", "evaluate", "--model", f"{{stages[{train}]}}", "--shards",
                            str(shards / "eval"), "--out", "{run_root}/results/table2/clotho/{method}/s{seed}",
                            "--workers", "0"],
            },
            "tables": {
                "script": "slurm/evaluate.sh",
                "after": ["eval_" + train],
                "command": ["{python}", "-m", "relret", "paper-tables", "--results", "{run_root}/results", "--out",
                            "{run_dir}/tables"],
            },
        },
    }  # fmt: skip
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = [sys.executable, "-m", "launcher", "pipeline", "--local", "--config", str(path)]
    first = subprocess.run(cli, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    runs = tmp_path / "runs"
    results = {m: [EvalResult.load(runs / "results/table2/clotho" / m / f"s{s}") for s in (0, 1)] for m in
               ("infonce", "listnet_audio")}  # fmt: skip
    data = json.loads((runs / "tables" / "tables" / "paper_tables.json").read_text())
    (test,) = data["tables"]["table2"]["datasets"]["clotho"]["ttests"]
    ids = results["infonce"][0].query_ids["t2a"]
    hand = {
        m: [np.mean([r.per_query["t2a"]["AP@10"][r.query_ids["t2a"].index(q)] for r in rs]) for q in ids]
        for m, rs in results.items()
    }
    if np.allclose(hand["listnet_audio"], hand["infonce"]):
        assert (test["t"], test["p"]) == (0.0, 1.0)
    else:
        ref = stats.ttest_rel(hand["listnet_audio"], hand["infonce"])
        assert test["t"] == pytest.approx(ref.statistic) and test["p"] == pytest.approx(ref.pvalue)
    assert test["df"] == len(ids) - 1 and (test["runs_a"], test["runs_b"]) == (2, 2)
    assert len(ids) == sum(1 + i % 4 for i in range(12))  # write_shard_dir: 1-4 captions per clip
    # the two methods' configs differ only where the grid says (the loss), each run its own seed
    saved = yaml.safe_load((runs / "t2_clotho_listnet_audio_s1" / "config.yaml").read_text())
    assert (saved["loss"]["name"], saved["train"]["seed"]) == ("listnet", 1)

    second = subprocess.run(cli, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert sum("skipped" in line for line in second.stdout.splitlines()) == 4 + 4 + 1

    changed = subprocess.run([*cli, "overrides=[optim.lr=0.005]"], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)  # fmt: skip
    assert changed.returncode == 2
    assert "stages.t2_clotho_infonce_s0: run directory" in changed.stderr
    assert "differing keys: optim.lr." in changed.stderr
