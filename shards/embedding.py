"""Caption embeddings for the shards: a Ray actor that holds one Sentence-BERT model and embeds caption lists.

The job starts a pool of these: `num_gpus=1` each on a cluster with GPUs, CPU actors otherwise. The model is loaded
once per actor, on the device Ray assigned. Output is unit-norm and stored as float16 (`relret.sbert`).

The model is a known name (`relret.sbert.MODELS`: all-MiniLM-L6-v2, all-mpnet-base-v2) or a directory. A name is
resolved by each actor on its own node, since an installed model lives in that node's cache (`python -m relret sbert
install NAME` on every node, or one install in a RELRET_CACHE that all nodes share); a missing one fails the actor
with a message naming that command.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class SbertEmbedder:
    """Use as a Ray actor (`ray.remote(SbertEmbedder)`)."""

    def __init__(self, name_or_path: str | None, device: str | None = None, cpu_threads: int | None = None) -> None:
        import relret  # noqa: F401  (the compatibility step must run before sentence_transformers is imported)
        from relret.sbert import load_sbert, resolve_sbert

        self.path = resolve_sbert(name_or_path)  # once, before the slow imports: a missing model fails at once
        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        self.model = load_sbert(self.path, device)

    def dim(self) -> int:
        """D of the embeddings."""
        from relret.sbert import embedding_dim

        return embedding_dim(self.model)

    def device(self) -> str:
        return str(self.model.device)

    def model_path(self) -> str:
        """The directory the model was loaded from, on this actor's node."""
        return self.path

    def embed(self, captions: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """float16 [len(captions), D], unit-norm rows."""
        from relret.sbert import embed_captions

        return embed_captions(self.model, captions, batch_size=batch_size).astype(np.float16)
