"""A faiss index of a collection's audio embeddings, with the clip names beside it.

Layout of an index directory: `index.faiss` (inner-product index over unit-norm embeddings, i.e. cosine),
`names.json` (clip name per row) and `meta.json` (dimension, count, the model it came from). The directory is
written under a temporary name and renamed, so a crash never leaves a half-written index. Search runs on GPU faiss
where faiss was built with GPU support and a GPU is visible, on CPU otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from relret.run_dir import atomic_output_dir

INDEX_FILE = "index.faiss"
NAMES_FILE = "names.json"
META_FILE = "meta.json"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise RuntimeError("faiss is not installed: `pip install -e '.[cpu]'` (or '.[gpu]' on a GPU machine)") from None
    return faiss


def _as_unit_float32(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, E] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf")
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has a zero vector at row {int(np.argmax(norms[:, 0] == 0))}")
    # numpy 2 upcasts float32 / float64 to float64; faiss needs float32.
    return np.ascontiguousarray((x / norms).astype(np.float32))


class AudioIndex:
    """Cosine search over clip embeddings."""

    def __init__(self, index, names: list[str], meta: dict[str, object]) -> None:
        self.index = index
        self.names = names
        self.meta = meta
        self.on_gpu = False

    @classmethod
    def build(
        cls, embeddings: np.ndarray, names: Sequence[str], meta: Mapping[str, object] | None = None
    ) -> AudioIndex:
        faiss = _faiss()
        emb = _as_unit_float32(embeddings, "embeddings")
        if len(names) != emb.shape[0]:
            raise ValueError(f"{len(names)} names for {emb.shape[0]} embeddings")
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        return cls(index, list(names), dict(meta or {}, dim=int(emb.shape[1]), count=int(emb.shape[0])))

    def to_gpu_if_available(self) -> AudioIndex:
        faiss = _faiss()
        if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
            self.index = faiss.index_cpu_to_all_gpus(self.index)
            self.on_gpu = True
        return self

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        """For each query embedding [Q, E], the top k (clip name, cosine) pairs, best first."""
        q = _as_unit_float32(queries, "queries")
        if q.shape[1] != self.meta["dim"]:
            raise ValueError(f"query dimension {q.shape[1]} does not match the index's {self.meta['dim']}")
        k = min(k, len(self.names))
        scores, idx = self.index.search(q, k)
        return [
            [(self.names[j], float(s)) for j, s in zip(row_idx, row_s) if j >= 0] for row_idx, row_s in zip(idx, scores)
        ]

    def save(self, directory: str | Path) -> None:
        faiss = _faiss()
        cpu_index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        with atomic_output_dir(directory) as tmp:
            faiss.write_index(cpu_index, str(tmp / INDEX_FILE))
            # ASCII escapes: a file name that is not UTF-8 (a surrogate-escaped byte) survives the round trip
            (tmp / NAMES_FILE).write_text(json.dumps(self.names), encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2), encoding="utf-8")

    @staticmethod
    def is_index(directory: str | Path) -> bool:
        """Whether `directory` holds an index written by `save` (so a new one may replace it)."""
        return all((Path(directory) / f).is_file() for f in (INDEX_FILE, NAMES_FILE, META_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> AudioIndex:
        faiss = _faiss()
        directory = Path(directory)
        missing = [f for f in (INDEX_FILE, NAMES_FILE, META_FILE) if not (directory / f).is_file()]
        if missing:
            raise ValueError(
                f"{directory} is not an index directory (missing {', '.join(missing)}); build one with "
                "`python -m relret index`"
            )
        names = json.loads((directory / NAMES_FILE).read_text(encoding="utf-8"))
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        index = faiss.read_index(str(directory / INDEX_FILE))
        if index.ntotal != len(names):
            raise ValueError(f"{directory}: the index holds {index.ntotal} vectors but names.json {len(names)} names")
        return cls(index, names, meta)


def _embed_shard_audio(model, shard_dirs: Sequence[str], batch_size: int, max_duration_s: float):
    """(embeddings [N, E], names) of every clip in the shard directories, read with the training reader."""
    import torch

    from relret.data import ValStream, eval_data_config, make_loader, open_eval_shards

    sets = open_eval_shards(shard_dirs)
    cfg = eval_data_config(sets, max_duration_s, batch_size, num_workers=1)
    embeddings, names = [], []
    with torch.no_grad(), make_loader(ValStream(sets, cfg, 0, 1), cfg) as loader:
        for batch in loader:
            emb = model.model.encode_audio(
                batch.to(model.device).audio, batch.audio_len.to(model.device), normalize=True
            )
            embeddings.append(emb.float().cpu().numpy())
            names.extend(batch.source_files)
    return np.concatenate(embeddings), names


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def model_fingerprint(model) -> str:
    """The sha256 of a RetrievalModel's weights (an export records it; otherwise it is computed)."""
    from relret import packaging

    if packaging.is_export(model.source):
        recorded = packaging.read_export_marker(model.source).get("weights_sha256")
        if recorded:
            return recorded
    return model.weights_sha256()


def main_index(argv: Sequence[str] | None = None) -> int:
    """`python -m relret index --model M (--shards DIR... | --audio-dir DIR) --out INDEX_DIR`."""
    import argparse
    import sys

    from relret.retrieval import RetrievalModel
    from relret.run_dir import check_output_dir

    parser = argparse.ArgumentParser(prog="python -m relret index", description=main_index.__doc__)
    parser.add_argument("--model", required=True, help="run directory, checkpoint directory or exported model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", nargs="+", help="shard directories whose clips to index")
    source.add_argument("--audio-dir", help="a folder of audio files (any format libsndfile reads) to index")
    parser.add_argument("--pattern", default="*.wav", help="file glob under --audio-dir (recursive with **/)")
    parser.add_argument("--out", required=True, help="index directory to write (new, empty, or an earlier index)")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing non-empty directory")
    parser.add_argument("--max-duration-s", type=float, default=30.0)
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    args = parser.parse_args(argv)
    try:
        check_output_dir(args.out, AudioIndex.is_index(args.out), "index", args.overwrite)
        model = RetrievalModel.load(args.model)
        if args.shards:
            emb, names = _embed_shard_audio(model, args.shards, args.batch_size, args.max_duration_s)
        else:
            files = sorted(p for p in Path(args.audio_dir).glob(args.pattern) if p.is_file())
            if not files:
                raise ValueError(f"no file matches {args.pattern} under {args.audio_dir}")
            emb = model.encode_audio_files(files, args.max_duration_s, args.batch_size)
            names = [str(p.relative_to(args.audio_dir)) for p in files]
        meta = {
            "model": str(Path(args.model).resolve()),
            "model_sha256": model_fingerprint(model),
            "source": args.shards or args.audio_dir,
        }
        AudioIndex.build(emb, names, meta).save(args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"index: {exc}", file=sys.stderr)
        return 2
    print(f"indexed {len(names)} clips into {args.out} (dimension {emb.shape[1]})")
    return 0


def main_search(argv: Sequence[str] | None = None) -> int:
    """`python -m relret search "a dog barks in the rain" --index DIR [-k 10] [--model M]`."""
    import argparse
    import sys

    from relret.retrieval import RetrievalModel

    # A query may hold bytes that are not UTF-8 (a shell's arguments): print them escaped rather than crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = argparse.ArgumentParser(prog="python -m relret search", description=main_search.__doc__)
    parser.add_argument("queries", nargs="+", help="one or more text queries")
    parser.add_argument("--index", required=True, help="index directory written by `python -m relret index`")
    parser.add_argument(
        "--model", default=None, help="model to embed the queries (default: the one that built the index)"
    )
    parser.add_argument("-k", type=_positive_int, default=10, help="results per query")
    parser.add_argument(
        "--allow-other-model", action="store_true", help="search with --model although it did not build the index"
    )
    args = parser.parse_args(argv)
    try:
        empty = [i for i, q in enumerate(args.queries, start=1) if not q.strip()]
        if empty:
            raise ValueError(f"query {empty[0]} is empty or only whitespace: there is nothing to search for")
        index = AudioIndex.load(args.index).to_gpu_if_available()
        model = RetrievalModel.load(args.model or str(index.meta["model"]))
        recorded = index.meta.get("model_sha256")
        if args.model and recorded and not args.allow_other_model and model_fingerprint(model) != recorded:
            raise ValueError(
                f"--model {args.model} is not the model that built the index {args.index} (which was "
                f"{index.meta['model']}): its embeddings are not comparable. Drop --model to use the index's own, "
                "rebuild the index with this model, or pass --allow-other-model"
            )
        for i, (query, n_tokens) in enumerate(zip(args.queries, model.token_counts(args.queries)), start=1):
            if n_tokens > model.max_tokens:
                print(
                    f"search: note: query {i} is cut to its first {model.max_tokens} tokens (of {n_tokens}), as "
                    f"captions were in training: {query[:60]!r}...",
                    file=sys.stderr,
                )
        hits = index.search(model.encode_text(args.queries), args.k)
    except (ValueError, FileNotFoundError) as exc:
        print(f"search: {exc}", file=sys.stderr)
        return 2
    for query, results in zip(args.queries, hits):
        print(f"{query}")
        for rank, (name, score) in enumerate(results, start=1):
            print(f"  {rank:>2}. {score:6.3f}  {name}")
    return 0
