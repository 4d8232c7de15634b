"""`RetrievalModel`: a trained dual encoder packaged for search, loadable without training code or DeepSpeed.

    model = relret.RetrievalModel.from_pretrained("exported/")     # written by `python -m relret export`
    text = model.encode_text(["a dog barks in the rain"])          # [1, E] unit-norm float32
    audio = model.encode_audio_files(["clip.wav"])                 # [1, E]
    scores = text @ audio.T                                        # cosine similarities

An export directory (relret.packaging) holds `model.safetensors` (float32 weights), `config.yaml` (the model section of
the training config), `text_encoder/` (the text model's config and tokenizer) and `relret_model.json` (format marker,
origin and the weights' sha256).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from relret import packaging
from relret.run_dir import atomic_output_dir, check_output_dir


class RetrievalModel:
    """Text and audio in, unit-norm embeddings out (numpy float32). Cosine similarity is the dot product."""

    def __init__(self, model, model_cfg, source: str) -> None:
        self.model = model
        self.model_cfg = model_cfg
        self.source = source

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg.embed_dim)

    # -- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device | None = None) -> RetrievalModel:
        """Load an export directory (no training code, no DeepSpeed)."""
        packaging.read_export_marker(directory)
        model_cfg, _ = packaging.read_model_config(directory)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(packaging.build_from_directory(directory, model_cfg, device), model_cfg, str(directory))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> RetrievalModel:
        """An export directory, a training run directory (best, else latest checkpoint) or a checkpoint directory."""
        if packaging.is_export(path):
            return cls.from_pretrained(path, device)
        from relret.checkpoint import load_model, resolve_checkpoint

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, cfg = load_model(path, device)
        return cls(model, cfg.model, str(resolve_checkpoint(path)))

    def weights_sha256(self) -> str:
        """sha256 of the model's weights as an export writes them (identifies the model, e.g. in an index)."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            packaging.save_weights(Path(tmp) / packaging.MODEL_FILE, self.model)
            return packaging.sha256_file(Path(tmp) / packaging.MODEL_FILE)

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> None:
        """Write an export directory: refused where something else is (`relret.run_dir.check_output_dir`); an earlier
        export there is replaced file by file, other files are left alone."""
        check_output_dir(directory, packaging.is_export(directory), "model export", overwrite)
        with atomic_output_dir(directory) as tmp:
            packaging.write_export(tmp, self.model, self.model_cfg, self.source)

    @property
    def max_tokens(self) -> int:
        """Captions (and queries) are cut to this many tokens, as in training."""
        return int(self.model_cfg.text.max_tokens)

    def token_counts(self, captions: Sequence[str]) -> list[int]:
        """Tokens of each caption as the text encoder sees it (normalised, special tokens included), before the cut
        to `max_tokens`."""
        from relret.models.text import normalise_caption

        cfg, tokenizer = self.model_cfg.text, self.model.text_encoder.tokenizer
        texts = [normalise_caption(c, cfg.lowercase, cfg.strip_punctuation) for c in captions]
        # verbose=False: counting a long query's tokens is no "sequence too long" mistake worth transformers' warning
        return [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]

    # -- encoding ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, captions: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """[len(captions), E] unit-norm float32."""
        if isinstance(captions, str):
            raise TypeError("encode_text takes a list of captions; wrap a single caption in a list")
        if not captions:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        out = [
            self.model.encode_text(list(captions[i : i + batch_size]), normalize=True).cpu()
            for i in range(0, len(captions), batch_size)
        ]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def encode_audio(self, waveforms: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """Mono float32 waveforms at 32 kHz (any lengths) -> [len(waveforms), E] unit-norm float32."""
        out = []
        for i in range(0, len(waveforms), batch_size):
            chunk = [np.asarray(w, dtype=np.float32) for w in waveforms[i : i + batch_size]]
            if any(w.ndim != 1 or len(w) == 0 for w in chunk):
                raise ValueError("waveforms must be non-empty mono [T] arrays at 32 kHz")
            audio = torch.zeros(len(chunk), max(len(w) for w in chunk))
            for j, w in enumerate(chunk):
                audio[j, : len(w)] = torch.from_numpy(w)
            lengths = torch.tensor([len(w) for w in chunk])
            out.append(self.model.encode_audio(audio.to(self.device), lengths.to(self.device), normalize=True).cpu())
        if not out:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return torch.cat(out).numpy()

    def encode_audio_files(
        self, paths: Sequence[str | os.PathLike], max_duration_s: float | None = 30.0, batch_size: int = 16
    ) -> np.ndarray:
        """Audio files (anything libsndfile reads; mixed to mono, resampled to 32 kHz, local or s3://) -> [len(paths), E].
        An unusable file raises relret.audio.BadAudio (a ValueError) naming it and the reason."""
        from relret.audio import BadAudio, load_clip

        waveforms = []
        for path in paths:
            try:
                waveforms.append(load_clip(str(path), max_duration_s))
            except BadAudio as exc:
                raise BadAudio(f"{path}: {exc}") from None
        return self.encode_audio(waveforms, batch_size)


def main_export(argv: Sequence[str] | None = None) -> int:
    """`python -m relret export --model RUN_OR_CHECKPOINT --out DIR`: a self-contained model directory."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m relret export", description=main_export.__doc__)
    parser.add_argument("--model", required=True, help="run directory (best, else latest checkpoint) or checkpoint")
    parser.add_argument("--out", required=True, help="directory to write (new, empty, or an earlier export)")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing non-empty directory")
    args = parser.parse_args(argv)
    try:
        check_output_dir(args.out, packaging.is_export(args.out), "model export", args.overwrite)
        model = RetrievalModel.load(args.model, device="cpu")
        model.save_pretrained(args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {model.source} to {args.out}; load it with relret.RetrievalModel.from_pretrained({args.out!r})")
    return 0
