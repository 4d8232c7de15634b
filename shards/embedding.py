"""Caption embeddings for the shards: a Ray actor that holds one Sentence-BERT model and embeds caption lists.

The job starts a pool of these: `num_gpus=1` each on a cluster with GPUs, CPU actors otherwise. The model is loaded
once per actor, on the device Ray assigned. Output is unit-norm and stored as float16 (`relret.sbert`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class SbertEmbedder:
    """Use as a Ray actor (`ray.remote(SbertEmbedder)`)."""

    def __init__(self, path: str | None, device: str | None = None, cpu_threads: int | None = None) -> None:
        import relret  # noqa: F401  (the compatibility step must run before sentence_transformers is imported)
        from relret.sbert import load_sbert

        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        self.model = load_sbert(path, device)

    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def device(self) -> str:
        return str(self.model.device)

    def embed(self, captions: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """float16 [len(captions), D], unit-norm rows."""
        from relret.sbert import embed_captions

        return embed_captions(self.model, captions, batch_size=batch_size).astype(np.float16)
