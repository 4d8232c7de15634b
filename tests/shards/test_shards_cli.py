"""The shard job's command line, built from BuildConfig's fields (`shards/cli.py`) and validated like a config."""

import argparse
import dataclasses
from typing import Literal

import pytest

from relret.config import ConfigError
from shards import cli, job


def _help_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}


def test_every_field_is_a_flag_with_its_docstring():
    """One flag per BuildConfig field, the four without default required, the help text the field's docstring (the
    texts below are copied from the help of the hand-built parser this replaced)."""
    actions = _help_of(job.build_parser())
    names = [f.name for f in dataclasses.fields(job.BuildConfig)]
    assert list(actions) == ["--" + n.replace("_", "-") for n in names]
    assert [a.dest for a in actions.values() if a.required] == ["dataset", "captions", "audio_dir", "out"]
    assert actions["--samples-per-shard"].help == "Samples in every shard but the last."
    assert actions["--sbert-device"].help == (
        "auto | cuda | cpu: SBERT actors with num_gpus=1 (cuda; they wait for GPU nodes to join) or on CPU; auto "
        "picks cuda when the cluster has GPUs at the start."
    )
    assert actions["--wavcaps-subset"].help == (
        "freesound | bbc | soundbible | audioset_sl; default from the JSON file name (fsd_final.json, ...)."
    )
    assert actions["--dataset"].choices == ("clotho", "audiocaps", "wavcaps", "folder")
    assert actions["--progress-bar"].option_strings == ["--progress-bar", "--no-progress-bar"]
    assert actions["--blacklist"].metavar == "FILE" and isinstance(actions["--blacklist"], argparse._AppendAction)
    assert (actions["--seed"].type, actions["--max-duration-s"].type, actions["--sbert-actors"].type) == (
        int,
        float,
        int,
    )
    text = job.build_parser().format_help()
    assert "2.6% of the train clips" in text and "--max-missing-fraction MAX_MISSING_FRACTION" in text


def test_flags_give_the_same_config_as_python():
    """Every kind of field (str, int, float from an integer, X | None, list, bool) parses to what BuildConfig(...) holds;
    flags not given keep the dataclass defaults."""
    argv = [
        "--dataset", "wavcaps", "--captions", "sb_final.json", "--audio-dir", "s3://b/audio", "--out", "out",
        "--samples-per-shard", "7", "--max-duration-s", "20", "--sbert-actors", "3", "--blacklist", "a.json",
        "--blacklist", "b.csv", "--no-progress-bar", "--max-missing-fraction", "0.2", "--object-store-mb", "512",
    ]  # fmt: skip
    cfg = cli.parse_dataclass(job.BuildConfig, job.build_parser(), argv)
    assert cfg == job.BuildConfig(
        dataset="wavcaps", captions="sb_final.json", audio_dir="s3://b/audio", out="out", samples_per_shard=7,
        max_duration_s=20.0, sbert_actors=3, blacklist=["a.json", "b.csv"], progress_bar=False,
        max_missing_fraction=0.2, object_store_mb=512,
    )  # fmt: skip
    assert isinstance(cfg.max_duration_s, float) and cfg.writers is None and cfg.verify == "sha256"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--samples-per-shard", "0"], "^--samples-per-shard must be at least 1, got 0$"),
        (["--max-missing-fraction", "1.5"], r"^--max-missing-fraction must be in \[0, 1\], got 1.5$"),
        (["--blacklist", "x.json"], "^--blacklist applies to WavCaps only; Clotho takes no options$"),
        (["--audio-template", "{youtube_id}.wav"], "^--audio-template applies to AudioCaps and WavCaps only"),
        (["--split", "Dev"], r"split name 'Dev' must match \[a-z0-9_\]\+"),
    ],
)
def test_values_are_refused_by_the_config_checks(extra, match):
    """Values BuildConfig or the reader's options refuse raise ConfigError in their own words, naming the flag."""
    base = ["--dataset", "clotho", "--captions", "c.csv", "--audio-dir", "a", "--out", "o"]
    with pytest.raises(ConfigError, match=match):
        cli.parse_dataclass(job.BuildConfig, job.build_parser(), base + extra)


def test_malformed_flags_exit_through_argparse(capsys):
    """A value argparse cannot read as the field's type, or an unknown dataset, exits with status 2 and usage."""
    base = ["--captions", "c.csv", "--audio-dir", "a", "--out", "o"]
    for argv in (["--dataset", "clotho", "--seed", "x"], ["--dataset", "esc50"]):
        with pytest.raises(SystemExit) as exc:
            cli.parse_dataclass(job.BuildConfig, job.build_parser(), base + argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seed: invalid int value: 'x'" in err and "invalid choice: 'esc50'" in err


@dataclasses.dataclass
class _Example:
    """A dataclass with the annotations the flag builder handles."""

    mode: Literal["fast", "exact"] = "fast"
    """How to run."""
    sizes: tuple[int, ...] = (1, 2)
    """Sizes, repeated."""
    verbose: bool = False
    """Talk more (100%)."""
    limit: float | None = None

    def __post_init__(self) -> None:
        if any(s < 1 for s in self.sizes):
            raise ValueError(f"--sizes must be positive, got {list(self.sizes)}")


def test_generic_dataclass_flags():
    """Literal fields get choices, tuples repeat, bools toggle, a field without a docstring gets an empty help; the
    values reach the dataclass converted (tuple) and checked (__post_init__)."""
    parser = cli.dataclass_parser(_Example, prog="x")
    actions = _help_of(parser)
    assert actions["--mode"].choices == ("fast", "exact") and actions["--mode"].help == "How to run."
    assert actions["--verbose"].help == "Talk more (100%%)." and actions["--limit"].help == ""
    assert "Talk more (100%)." in parser.format_help()
    got = cli.parse_dataclass(_Example, parser, ["--sizes", "3", "--sizes", "4", "--verbose", "--limit", "2"])
    assert got == _Example(mode="fast", sizes=(3, 4), verbose=True, limit=2.0)
    assert cli.parse_dataclass(_Example, parser, []) == _Example()
    with pytest.raises(ConfigError, match=r"^--sizes must be positive, got \[0\]$"):
        cli.parse_dataclass(_Example, parser, ["--sizes", "0"])
