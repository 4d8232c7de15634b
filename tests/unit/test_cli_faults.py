"""The commands against a user's mistakes (issue 16): an --out that holds what the command did not write, a file
where a directory belongs, -k below 1, empty and overlong queries, an index of another model, a terminal that cannot
print the query, and saves of one model that must be byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from kit.shards import write_shard_dir

from relret.__main__ import main as relret_main
from relret.config import AudioEncoderConfig, ModelConfig, TextEncoderConfig
from relret.index import AudioIndex
from relret.models import build_model
from relret.retrieval import RetrievalModel

pytestmark = pytest.mark.slow

MAX_TOKENS = 12
TINY = ModelConfig(
    audio=AudioEncoderConfig(embed_dim=16, depth=1, num_heads=2, window_s=1.0, input_tdim=98),
    text=TextEncoderConfig(
        tokenizer="minilm", random_init=True, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
        max_tokens=MAX_TOKENS,
    ),
    embed_dim=8,
    proj_hidden_dim=12,
)  # fmt: skip
COMMANDS = ("export", "index", "evaluate")
OWN_FILE = {"export": "relret_model.json", "index": "meta.json", "evaluate": "eval.json"}
"""The file of each command's output that names the model it came from."""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Two exported tiny random models of one dimension (seeds 0 and 1), three WAVs indexed with model0 by
    `relret index`, and four clips of evaluation shards."""
    root = tmp_path_factory.mktemp("faults")
    for seed in (0, 1):
        torch.manual_seed(seed)
        RetrievalModel(build_model(TINY).eval(), TINY, f"tiny-seed{seed}").save_pretrained(root / f"model{seed}")
    audio = root / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.wav", "b.wav", "c.wav"):
        sf.write(audio / name, 0.1 * rng.standard_normal(16_000).astype(np.float32), 32_000)
    argv = ["index", "--model", str(root / "model0"), "--audio-dir", str(audio), "--out", str(root / "index")]
    assert relret_main(argv) == 0
    write_shard_dir(root / "shards", split="val", n_clips=4, per_shard=4, durations_s=(1.0,), seed=3)
    return {"model0": root / "model0", "model1": root / "model1", "audio": audio, "index": root / "index",
            "shards": root / "shards"}  # fmt: skip


def cli(capsys, *argv) -> tuple[int, str, str]:
    """`python -m relret ARGV` in this process: (exit code, stdout, stderr); argparse's exits count as codes."""
    capsys.readouterr()
    try:
        code = relret_main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def command_argv(command: str, world: dict[str, Path], model: str, out: Path) -> list:
    if command == "export":
        return ["export", "--model", world[model], "--out", out]
    if command == "index":
        return ["index", "--model", world[model], "--audio-dir", world["audio"], "--out", out]
    return ["evaluate", "--model", world[model], "--shards", world["shards"], "--out", out, "--workers", "0",
            "--max-duration-s", "1"]  # fmt: skip


def assert_one_line_error(err: str, *names) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def make_run_dir(path: Path) -> dict[str, bytes]:
    """A training run's files (checkpoints/, metrics.jsonl, status.json); returns the snapshot."""
    (path / "checkpoints" / "step-00000004").mkdir(parents=True)
    (path / "checkpoints" / "step-00000004" / "model.safetensors").write_bytes(b"weights of step 4")
    (path / "checkpoints" / "latest").write_text("step-00000004\n")
    (path / "metrics.jsonl").write_text('{"kind": "train", "step": 4, "loss": 1.5}\n')
    (path / "status.json").write_text('{"state": "completed", "step": 4}\n')
    return snapshot(path)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_run_directory_as_out_is_refused_even_with_overwrite(command, world, tmp_path, capsys):
    """--out naming a training run: exit 2, one line naming it and --overwrite, every file intact, nothing left."""
    run = tmp_path / "run"
    before = make_run_dir(run)
    for extra in ([], ["--overwrite"]):
        code, out, err = cli(capsys, *command_argv(command, world, "model0", run), *extra)
        assert code == 2, (extra, out, err)
        assert_one_line_error(err, run, "--overwrite")
        assert snapshot(run) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary directory left beside it


@pytest.mark.parametrize("command", COMMANDS)
def test_overwrite_replaces_a_previous_output_of_the_same_command(command, world, tmp_path, capsys):
    """An output of model0 rewritten with model1 and --overwrite names model1 afterwards, with no leftovers."""
    out_dir = tmp_path / "out"
    assert cli(capsys, *command_argv(command, world, "model0", out_dir))[0] == 0
    names = sorted(p.name for p in out_dir.iterdir())
    code, out, err = cli(capsys, *command_argv(command, world, "model1", out_dir), "--overwrite")
    assert code == 0, err
    own = (out_dir / OWN_FILE[command]).read_text(encoding="utf-8")
    assert str(world["model1"]) in own and str(world["model0"]) not in own
    assert sorted(p.name for p in out_dir.iterdir()) == names
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_foreign_directory_needs_overwrite_and_keeps_its_files(command, world, tmp_path, capsys):
    """--out holding other files: refused naming --overwrite; with it the command adds its files beside them."""
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "data" / "table.csv").write_text("a,b\n1,2\n")
    before = snapshot(mine)
    code, out, err = cli(capsys, *command_argv(command, world, "model0", mine))
    assert code == 2, (out, err)
    assert_one_line_error(err, mine, "--overwrite")
    assert snapshot(mine) == before
    code, out, err = cli(capsys, *command_argv(command, world, "model0", mine), "--overwrite")
    assert code == 0, err
    after = snapshot(mine)
    assert {k: after.get(k) for k in before} == before
    assert OWN_FILE[command] in after


@pytest.mark.parametrize("command", COMMANDS)
def test_an_existing_file_as_out_is_a_one_line_error(command, world, tmp_path, capsys):
    """--out naming a regular file: exit 2, one line naming it, the file unchanged."""
    file = tmp_path / "results.txt"
    file.write_text("keep me")
    code, out, err = cli(capsys, *command_argv(command, world, "model0", file))
    assert code == 2, (out, err)
    assert_one_line_error(err, file, "is a file")
    assert file.read_text() == "keep me"


@pytest.mark.parametrize("k", ["0", "-1"])
def test_search_k_below_one_is_a_usage_error(k, world, capsys):
    """-k 0 and -k -1: exit 2 with argparse's one error line, no traceback, nothing searched."""
    code, out, err = cli(capsys, "search", "a low hum", "--index", world["index"], "-k", k)
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "argument -k" in errors[0] and "at least 1" in errors[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("queries", [[""], ["   \t"], ["a low hum", " "]], ids=["empty", "blank", "second-blank"])
def test_search_refuses_empty_queries(queries, world, capsys):
    """An empty or whitespace-only query: exit 2, one line naming which query, nothing searched."""
    code, out, err = cli(capsys, "search", *queries, "--index", world["index"])
    assert code == 2 and out == ""
    assert_one_line_error(err, f"query {len(queries)}", "empty")


def test_search_refuses_the_index_of_another_model(world, capsys):
    """--model of the same dimension that did not build the index: exit 2 naming both models; the index's own model
    named explicitly and --allow-other-model search."""
    code, out, err = cli(capsys, "search", "a low hum", "--index", world["index"], "--model", world["model1"])
    assert code == 2 and out == ""
    assert_one_line_error(err, world["model1"], world["model0"].resolve(), "--allow-other-model")
    for argv in (["--model", world["model0"]], ["--model", world["model1"], "--allow-other-model"]):
        code, out, err = cli(capsys, "search", "a low hum", "--index", world["index"], "-k", "3", *argv)
        assert code == 0, err
        assert len(out.splitlines()) == 4


def test_search_notes_that_a_long_query_is_cut(world, capsys):
    """A 10,000-character query is searched, with one note on stderr that it was cut to the model's max tokens."""
    query = ("a dog barks in the rain " * 500)[:10_000]
    code, out, err = cli(capsys, "search", query, "--index", world["index"], "-k", "2")
    assert code == 0, err
    assert out.splitlines()[0] == query and len(out.splitlines()) == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "note" in lines[0] and "query 1" in lines[0], err
    assert f"first {MAX_TOKENS} tokens" in lines[0]


def test_search_prints_bytes_that_are_not_utf8_on_an_ascii_terminal(world, tmp_path):
    """A query byte that is not UTF-8 (surrogate-escaped in argv) and such a clip name print escaped under LANG=C and
    PYTHONIOENCODING=ascii:strict instead of crashing."""
    index = AudioIndex.load(world["index"])
    index.names[0] = "caf\udce9.wav"
    index.save(tmp_path / "index")
    env = {**os.environ, "PYTHONIOENCODING": "ascii:strict", "LANG": "C", "LC_ALL": "C"}
    argv = [sys.executable, "-m", "relret", "search", b"caf\xe9 hum", "--index", str(tmp_path / "index"), "-k", "3"]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode("ascii", "replace")[-3000:]
    lines = proc.stdout.decode("ascii").splitlines()
    assert lines[0] == "caf\\udce9 hum" and len(lines) == 4
    assert sum(line.endswith("  caf\\udce9.wav") for line in lines[1:]) == 1


SAVE_SCRIPT = """
import hashlib, json, sys
from pathlib import Path
from relret.retrieval import RetrievalModel

export, out = Path(sys.argv[1]), Path(sys.argv[2])
model = RetrievalModel.from_pretrained(export, device="cpu")
hashes = {}
for i in range(3):
    model.save_pretrained(out / f"export{i}")
    hashes[f"save_pretrained{i}"] = hashlib.sha256((out / f"export{i}" / "model.safetensors").read_bytes()).hexdigest()
print(json.dumps(hashes), flush=True)
from relret import packaging

packaging.save_model_files(out / "files", model.model, "model: {}\\n")
packaging.write_export(out / "written", model.model, model.model_cfg, model.source)
for name in ("files", "written"):
    hashes[name] = hashlib.sha256((out / name / "model.safetensors").read_bytes()).hexdigest()
print(json.dumps(hashes))
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_identical_saves_write_identical_bytes(world, tmp_path):
    """One model saved by save_pretrained, save_model_files and write_export in this process and in another with a
    different PYTHONHASHSEED: every model.safetensors has the same sha256, the one the export's marker records."""
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    argv = [sys.executable, "-c", SAVE_SCRIPT, str(world["model0"]), str(tmp_path / "other")]
    proc = subprocess.run(argv, cwd=tmp_path, env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    printed = proc.stdout.strip().splitlines()[-1:]
    hashes = {f"other process: {k}": v for k, v in json.loads(printed[0] if printed else "{}").items()}
    hashes["this process: save_pretrained"] = sha256(world["model0"] / "model.safetensors")
    assert len(set(hashes.values())) == 1, hashes
    assert proc.returncode == 0, proc.stderr[-3000:]

    from relret import packaging

    model = RetrievalModel.from_pretrained(world["model0"], device="cpu")
    packaging.save_model_files(tmp_path / "files", model.model, "model: {}\n")
    packaging.write_export(tmp_path / "written", model.model, model.model_cfg, model.source)
    for name in ("files", "written"):
        hashes[f"this process: {name}"] = sha256(tmp_path / name / "model.safetensors")
    assert len(hashes) == 8 and len(set(hashes.values())) == 1, hashes
    marker = json.loads((world["model0"] / "relret_model.json").read_text())
    assert marker["weights_sha256"] == hashes["this process: save_pretrained"]


def test_a_pipeline_stage_directory_is_a_fine_output_directory(tmp_path):
    """The launcher writes a command stage's status.json into the stage's directory before the command runs: that
    directory (status of kind "command" and nothing else) takes the command's output; any other file makes it
    foreign again, and a training status makes it a run directory's kind of status, not a stage's."""
    from relret.run_dir import check_output_dir, write_status

    stage = tmp_path / "evaluate"
    stage.mkdir()
    write_status(stage, "running", kind="command")
    check_output_dir(stage, False, "evaluation")
    (stage / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not a previous evaluation"):
        check_output_dir(stage, False, "evaluation")
    (stage / "notes.txt").unlink()
    write_status(stage, "running", kind="train")
    with pytest.raises(ValueError, match="is not a previous evaluation"):
        check_output_dir(stage, False, "evaluation")
