"""`RetrievalModel`: a trained dual encoder packaged for search, loadable without training code or DeepSpeed.

    model = relret.RetrievalModel.from_pretrained("exported/")     # written by `python -m relret export`
    text = model.encode_text(["a dog barks in the rain"])          # [1, E] unit-norm float32
    audio = model.encode_audio_files(["clip.wav"])                 # [1, E]
    scores = text @ audio.T                                        # cosine similarities

An export directory holds `model.safetensors` (float32 weights), `config.yaml` (the model section of the training
config), `text_encoder/` (the text model's config and tokenizer) and `relret_model.json` (format marker and origin).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from relret.shard_format import SAMPLE_RATE_HZ
from relret.storage import atomic_local_dir

MARKER_FILE = "relret_model.json"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TEXT_DIR = "text_encoder"
FORMAT = "relret-retrieval-model"
FORMAT_VERSION = 1


def _build(model_cfg, text_dir: Path, weights: Path, device: str | torch.device):
    """A DualEncoder from a model config, a saved text model folder and safetensors weights (strict)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    from relret.models import build_model
    from relret.models.text import load_tokenizer

    text_model = AutoModel.from_config(AutoConfig.from_pretrained(str(text_dir)), add_pooling_layer=False)
    model = build_model(
        model_cfg, text_model=text_model, tokenizer=load_tokenizer(str(text_dir)), load_audio_weights=False
    )
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval()


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
        import yaml

        from relret.config import from_dict
        from relret.models import ModelConfig

        directory = Path(directory)
        marker = directory / MARKER_FILE
        if not marker.is_file():
            raise ValueError(
                f"{directory} is not an exported relret model (no {MARKER_FILE}); write one with "
                "`python -m relret export --checkpoint RUN_OR_CHECKPOINT --out DIR`"
            )
        meta = json.loads(marker.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{marker}: format {meta.get('format')!r} v{meta.get('format_version')}, expected {FORMAT} v{FORMAT_VERSION}"
            )
        cfg = from_dict(
            ModelConfig, yaml.safe_load((directory / CONFIG_FILE).read_text(encoding="utf-8"))["model"], "model"
        )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(_build(cfg, directory / TEXT_DIR, directory / MODEL_FILE, device), cfg, str(directory))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> RetrievalModel:
        """An export directory, a training run directory (best, else latest checkpoint) or a checkpoint directory."""
        if (Path(path) / MARKER_FILE).is_file():
            return cls.from_pretrained(path, device)
        from relret.checkpoint import load_model, resolve_checkpoint

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, cfg = load_model(path, device)
        return cls(model, cfg.model, str(resolve_checkpoint(path)))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write an export directory (atomically: a temporary directory renamed when complete)."""
        import yaml
        from safetensors.torch import save_file

        from relret.config import to_dict

        with atomic_local_dir(directory) as tmp:
            state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt", "producer": "relret"})
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump({"model": to_dict(self.model_cfg)}, sort_keys=False))
            text = self.model.text_encoder
            text.model.config.save_pretrained(str(tmp / TEXT_DIR))
            text.tokenizer.save_pretrained(str(tmp / TEXT_DIR))
            marker = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "source": self.source,
                "sample_rate": SAMPLE_RATE_HZ,
                "embed_dim": self.embed_dim,
            }
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2))

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
    parser.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    args = parser.parse_args(argv)
    try:
        model = RetrievalModel.load(args.model, device="cpu")
    except (ValueError, FileNotFoundError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    model.save_pretrained(args.out)
    print(f"exported {model.source} to {args.out}; load it with relret.RetrievalModel.from_pretrained({args.out!r})")
    return 0
