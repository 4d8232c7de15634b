"""A trained dual encoder on disk: the files that checkpoints and exports share, written and read in one place.

    DIR/model.safetensors     float32 weights of the whole DualEncoder (byte-identical for identical weights)
    DIR/config.yaml           the config: a checkpoint's full training config, or an export's `model:` section
    DIR/text_encoder/         the text model's config.json and tokenizer files, so no hub is needed to rebuild it

An export adds `relret_model.json` (format marker, origin, embedding dimension and the weights' sha256). Loading
needs neither DeepSpeed nor the training code: `load_model(DIR)` rebuilds the architecture from the config and the
text encoder folder, then loads the weights strictly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from relret.config import ModelConfig, TrainConfig, from_dict, to_dict, upgrade_saved_config
from relret.run_dir import CONFIG_FILE, atomic_file, write_text_atomic

MODEL_FILE = "model.safetensors"
TEXT_DIR = "text_encoder"
EXPORT_MARKER = "relret_model.json"
EXPORT_FORMAT = "relret-retrieval-model"
EXPORT_FORMAT_VERSION = 1
SAFETENSORS_METADATA = {"format": "pt"}
"""One metadata key: safetensors writes its metadata map in arbitrary order, so a second key would make the bytes of
identical weights differ from one write to the next."""


def save_weights(path: str | Path, model: torch.nn.Module) -> None:
    """The model's state dict as float32 safetensors at `path` (atomically)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_file(path) as tmp:
        save_file(state, tmp, metadata=dict(SAFETENSORS_METADATA))


def save_model_files(directory: str | Path, model: torch.nn.Module, config_yaml: str) -> None:
    """model.safetensors, config.yaml and text_encoder/ into `directory` (each file written atomically)."""
    directory = Path(directory)
    save_weights(directory / MODEL_FILE, model)
    write_text_atomic(directory / CONFIG_FILE, config_yaml)
    text = model.text_encoder
    text.model.config.save_pretrained(str(directory / TEXT_DIR))
    text.tokenizer.save_pretrained(str(directory / TEXT_DIR))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_model_config(directory: str | Path) -> tuple[ModelConfig, TrainConfig | None]:
    """The model config of a model directory, and the whole training config when it is a checkpoint's."""
    data = yaml.safe_load((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"{Path(directory) / CONFIG_FILE} holds no `model` section: not a relret model directory")
    if set(data) == {"model"}:
        return from_dict(ModelConfig, data["model"], "model"), None
    train = from_dict(TrainConfig, upgrade_saved_config(data))
    return train.model, train


def load_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Load DIR/model.safetensors into `model`; every key and shape must match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(directory) / MODEL_FILE
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{file} cannot be read ({exc}); the checkpoint is damaged: use another one") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{file} does not fit the configured model: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:3]}; "
            "the model section of the config must match the checkpoint's config.yaml"
        )
    model.load_state_dict(state, strict=True)


def build_from_directory(directory: str | Path, model_cfg: ModelConfig, device: str | torch.device = "cpu"):
    """A DualEncoder in eval mode from a model directory: architecture from `model_cfg` and text_encoder/, weights
    from model.safetensors."""
    from transformers import AutoConfig, AutoModel

    from relret.models import build_model
    from relret.models.text import load_tokenizer

    directory = Path(directory)
    text_dir = directory / TEXT_DIR
    text_model = AutoModel.from_config(AutoConfig.from_pretrained(str(text_dir)), add_pooling_layer=False)
    model = build_model(
        model_cfg, text_model=text_model, tokenizer=load_tokenizer(str(text_dir)), load_audio_weights=False
    )
    load_weights(model, directory)
    return model.to(device).eval()


def write_export(directory: str | Path, model: torch.nn.Module, model_cfg: ModelConfig, source: str) -> None:
    """Fill `directory` (a fresh temporary directory) with an export: the model files and the marker, written last."""
    from relret.shard_format import SAMPLE_RATE_HZ

    directory = Path(directory)
    save_model_files(directory, model, yaml.safe_dump({"model": to_dict(model_cfg)}, sort_keys=False))
    marker = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "source": source,
        "sample_rate": SAMPLE_RATE_HZ,
        "embed_dim": int(model_cfg.embed_dim),
        "weights_sha256": sha256_file(directory / MODEL_FILE),
    }
    write_text_atomic(directory / EXPORT_MARKER, json.dumps(marker, indent=2))


def read_export_marker(directory: str | Path) -> dict[str, Any]:
    """An export's marker, checked for format and version."""
    marker = Path(directory) / EXPORT_MARKER
    if not marker.is_file():
        raise ValueError(
            f"{directory} is not an exported relret model (no {EXPORT_MARKER}); write one with "
            "`python -m relret export --model RUN_OR_CHECKPOINT --out DIR`"
        )
    meta = json.loads(marker.read_text(encoding="utf-8"))
    if meta.get("format") != EXPORT_FORMAT or meta.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ValueError(
            f"{marker}: format {meta.get('format')!r} v{meta.get('format_version')}, expected {EXPORT_FORMAT} "
            f"v{EXPORT_FORMAT_VERSION}"
        )
    return meta


def is_export(directory: str | Path) -> bool:
    return (Path(directory) / EXPORT_MARKER).is_file()
