"""A faiss index of a collection's audio embeddings, with the clip names beside it.

Layout of an index directory: `index.faiss` (inner-product index over unit-norm embeddings, i.e. cosine),
`names.json` (clip name per row) and `meta.json` (dimension, count, the model it came from). The directory is
written under a temporary name and renamed, so a crash never leaves a half-written index. Search runs on GPU faiss
where faiss was built with GPU support and a GPU is visible, on CPU otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

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
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        cpu_index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            faiss.write_index(cpu_index, str(tmp / INDEX_FILE))
            (tmp / NAMES_FILE).write_text(json.dumps(self.names, ensure_ascii=False), encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2), encoding="utf-8")
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

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
