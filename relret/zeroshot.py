"""Zero-shot classification: label a folder of clips by the nearest class caption ("the sound of a dog").

A labelled folder is audio files plus a CSV naming each file's class: ESC-50 (`meta/esc50.csv`:
filename,fold,target,category,...), UrbanSound8K (`metadata/UrbanSound8K.csv`: slice_file_name,...,class, files
under `audio/fold*/`) or a generic `file_name,class`. Each class becomes one caption per template, the class name
with underscores and hyphens as spaces; with several templates the class's text embedding is the mean of the unit
embeddings, renormalised (CLIP's and LAION-CLAP's prompt ensembling).

Metrics from audio embeddings [N, E], integer labels [N] and class text embeddings [C, E], scores = cosine:
- top-1 / top-5 accuracy: the true class among the k highest-scoring classes (k >= C gives 1);
- per-class AP: all N clips ranked by their cosine to the class text, AP = mean over the class's clips of the
  precision at their rank, over the whole ranking (not truncated); mAP = mean of the per-class APs over classes
  that have clips. This is LAION-CLAP's `map` (`np.mean(sklearn average_precision_score(target, pred,
  average=None))`), which WavCaps also reports as classification mAP; the one difference is that equal scores are
  ranked by lower clip index here, where scikit-learn counts tied scores as one threshold.
Ties in top-k also go to the lower class index (`relret.metrics.topk_indices`). WavCaps reports ESC-50 and
UrbanSound8K accuracy as the mean over the official folds; on all clips at once the two agree for ESC-50 (equal
folds) but not exactly for UrbanSound8K.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from relret.metrics import metrics_from_hits, topk_indices

DEFAULT_TEMPLATES = ("the sound of a {class}",)
# Known layouts, tried in this order: (file column, class column).
KNOWN_LAYOUTS = (
    ("filename", "category"),  # ESC-50 meta/esc50.csv (target is the integer id of category)
    ("slice_file_name", "class"),  # UrbanSound8K metadata/UrbanSound8K.csv
    ("file_name", "class"),  # generic
)


@dataclasses.dataclass
class LabelledFiles:
    """Clips of a labelled folder that exist, with their class."""

    paths: list[Path]
    """Audio files, in CSV order."""
    file_names: list[str]
    """The CSV's name of each file."""
    labels: np.ndarray
    """[N] int64 index into `class_names`."""
    class_names: list[str]
    """Sorted distinct class names as written in the CSV (classes whose files are all missing included)."""
    missing: list[str]
    """CSV file names with no file under the audio folder (skipped)."""
    rows: int
    """Data rows in the CSV."""


def _detect_columns(header: Sequence[str], file_column: str | None, class_column: str | None, path) -> tuple[str, str]:
    if file_column is None and class_column is None:
        file_column, class_column = next(
            ((f, c) for f, c in KNOWN_LAYOUTS if f in header and c in header), (None, None)
        )
    elif file_column is None:
        file_column = next((f for f, _ in KNOWN_LAYOUTS if f in header), None)
    elif class_column is None:
        class_column = next((c for _, c in KNOWN_LAYOUTS if c in header), None)
    if file_column is None or class_column is None:
        known = "; ".join(f"{f},{c}" for f, c in KNOWN_LAYOUTS)
        raise ValueError(
            f"{path}: cannot tell the file and class columns from the header {', '.join(header)}; known layouts: "
            f"{known}; pass file_column= and class_column="
        )
    for name in (file_column, class_column):
        if name not in header:
            raise ValueError(f"{path}: no column {name!r}; the header has {', '.join(header)}")
    return file_column, class_column


def read_labels(
    csv_path: str | os.PathLike,
    audio_dir: str | os.PathLike,
    file_column: str | None = None,
    class_column: str | None = None,
    max_missing_fraction: float = 0.01,
) -> LabelledFiles:
    """The CSV's (file, class) rows whose file exists under `audio_dir`.

    A CSV name is looked up as a path relative to `audio_dir`, then by base name anywhere below it (UrbanSound8K
    keeps its files in `fold1/` .. `fold10/`). Missing files are skipped and counted; more than
    `max_missing_fraction` of the rows missing raises ValueError with the counts and the first names.
    """
    csv_path, audio_dir = Path(csv_path), Path(audio_dir)
    if not audio_dir.is_dir():
        raise ValueError(f"audio folder {audio_dir} does not exist")
    with csv_path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        file_column, class_column = _detect_columns(header, file_column, class_column, csv_path)
        rows = [(row[file_column].strip(), row[class_column].strip()) for row in reader]
    if not rows:
        raise ValueError(f"{csv_path}: no data rows")
    for line, (name, cls) in enumerate(rows, start=2):
        if not name or not cls:
            raise ValueError(f"{csv_path}:{line}: empty file name or class")
    by_base: dict[str, list[Path]] = {}
    for p in audio_dir.rglob("*"):
        if p.is_file():
            by_base.setdefault(p.name, []).append(p)
    paths, names, classes, missing = [], [], [], []
    for name, cls in rows:
        direct = audio_dir / name
        found = [direct] if direct.is_file() else by_base.get(Path(name).name, [])
        if len(found) > 1:
            raise ValueError(
                f"{csv_path}: {name!r} matches {len(found)} files under {audio_dir} ({found[0]}, {found[1]}); name "
                "the file by its path relative to the audio folder"
            )
        if not found:
            missing.append(name)
            continue
        paths.append(found[0])
        names.append(name)
        classes.append(cls)
    if len(missing) > max_missing_fraction * len(rows):
        raise ValueError(
            f"{len(missing)} of {len(rows)} files named in {csv_path} are not under {audio_dir} (more than "
            f"{max_missing_fraction:.1%}), e.g. {missing[:3]}; check the audio folder, or raise max_missing_fraction"
        )
    class_names = sorted({cls for _, cls in rows})
    index = {c: i for i, c in enumerate(class_names)}
    return LabelledFiles(
        paths, names, np.array([index[c] for c in classes], dtype=np.int64), class_names, missing, len(rows)
    )


def class_prompt(class_name: str, template: str) -> str:
    """`template` with "{class}" replaced by the class name, underscores and hyphens made spaces."""
    if "{class}" not in template:
        raise ValueError(f"caption template {template!r} has no {{class}} placeholder")
    return template.replace("{class}", " ".join(class_name.replace("_", " ").replace("-", " ").split()))


def class_text_embeddings(
    class_names: Sequence[str], embed_text: Callable[[list[str]], object], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> np.ndarray:
    """[C, E] unit text embeddings of the classes: per class, the mean of its templates' unit embeddings, renormalised.

    `embed_text(captions) -> [n, E]` is the model's text encoder (any scale; rows are normalised here).
    """
    if not class_names or not templates:
        raise ValueError("need at least one class and one caption template")
    prompts = [class_prompt(c, t) for c in class_names for t in templates]
    emb = torch.as_tensor(embed_text(prompts)).detach().cpu().double().numpy()
    if emb.ndim != 2 or emb.shape[0] != len(prompts):
        raise ValueError(f"embed_text returned shape {emb.shape} for {len(prompts)} captions; expected [n, E]")
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    mean = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    if (norm == 0).any():
        raise ValueError("a class's template embeddings cancel out (mean is zero); use other templates")
    return mean / norm


def _unit(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu().double()
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [n, E] matrix, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or inf")
    norm = t.norm(dim=1, keepdim=True)
    if (norm == 0).any():
        raise ValueError(f"{name} has a zero row at {int((norm[:, 0] == 0).nonzero()[0])}: its cosine is undefined")
    return t / norm


def zero_shot_metrics(
    audio_emb, labels, class_text_emb, class_names: Sequence[str] | None = None, ks: Sequence[int] = (1, 5)
) -> dict:
    """Zero-shot accuracy and per-class AP (see the module docstring) from cosine scores.

    `audio_emb` [N, E], `labels` [N] ints in [0, C), `class_text_emb` [C, E]. Returns {"top1_acc", "top5_acc"
    (one per k), "mAP", "per_class_AP": {class: AP}, "classes_without_clips": [class...], "n_clips", "n_classes"};
    classes are keyed by `class_names` or by their index as a string.
    """
    audio = _unit(audio_emb, "audio_emb")
    text = _unit(class_text_emb, "class_text_emb")
    if audio.shape[1] != text.shape[1]:
        raise ValueError(f"audio_emb has dimension {audio.shape[1]} but class_text_emb has {text.shape[1]}")
    n, c = audio.shape[0], text.shape[0]
    y = torch.as_tensor(np.asarray(labels))
    if y.shape != (n,) or y.is_floating_point():
        raise ValueError(f"labels must be [N]={n} integers, got shape {tuple(y.shape)} ({y.dtype})")
    if n and (y.min() < 0 or y.max() >= c):
        raise ValueError(f"labels must lie in [0, {c}), got {int(y.min())}..{int(y.max())}")
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} class embeddings")
    scores = audio @ text.T  # [N, C]
    out: dict[str, object] = {"n_clips": n, "n_classes": c}
    ranked = topk_indices(scores, max(ks))  # [N, min(max k, C)]
    for k in ks:
        out[f"top{k}_acc"] = float((ranked[:, :k] == y[:, None]).any(dim=1).double().mean())
    # Per class, all N clips ranked by cosine to the class text: AP over the full ranking.
    order = topk_indices(scores.T.contiguous(), n)  # [C, N]
    hits = y[order] == torch.arange(c)[:, None]
    n_relevant = torch.bincount(y, minlength=c)
    has = n_relevant > 0
    ap = torch.full((c,), float("nan"), dtype=torch.float64)
    if has.any():
        ap[has] = metrics_from_hits(hits[has], n_relevant[has], ks=(1,), map_k=n)[f"AP@{n}"]
    out["per_class_AP"] = {names[i]: float(ap[i]) for i in range(c) if has[i]}
    out["mAP"] = float(ap[has].mean()) if has.any() else None
    out["classes_without_clips"] = [names[i] for i in range(c) if not has[i]]
    return out


def format_zero_shot(metrics: dict, title: str = "zero-shot") -> str:
    """One line: accuracies and mAP in percent, with the counts."""
    accs = ", ".join(f"{k.removesuffix('_acc')} {100 * v:.2f}%" for k, v in metrics.items() if k.endswith("_acc"))
    m = metrics["mAP"]
    text = f"{title}: {metrics['n_clips']} clips, {metrics['n_classes']} classes: {accs}, "
    text += f"mAP {100 * m:.2f}%" if m is not None else "mAP undefined"
    if metrics["classes_without_clips"]:
        text += f" ({len(metrics['classes_without_clips'])} class(es) without clips left out of the mAP)"
    return text
