"""The paper configs (configs/pretrain.yaml, finetune_clotho.yaml, finetune_audiocaps.yaml, resolved) hold the authors'
training settings, each checked against where it comes from.

Sources, read for this table: Xie et al.'s code, github.com/xieh97/text-audio-retrieval @ c0c18e1 ("xieh97"), and the
DCASE 2024 winner it follows, github.com/OptimusPrimus/salsa @ 983b450 ("salsa"), with hear21passt 0.0.26's
AugmentMelSTFT. `SETTINGS` is the table (the README's "The authors' settings" is generated from it by
`markdown_table()`); the tests after it check what a table cannot: the epoch length on the real Clotho captions, the
learning-rate curve, the log-mel front end and patchout against hear21passt, the DeepSpeed config and RoBERTa's
dropout.
"""

from __future__ import annotations

import csv
import dataclasses
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from relret.config import TrainConfig, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]
PAPER_CONFIGS = ("pretrain", "finetune_clotho", "finetune_audiocaps")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row: the authors' setting, where it is, and the relret key and value that hold it."""

    setting: str
    authors: str
    source: str
    key: str
    value: Any
    """The relret value in every paper config, or {config name: value}."""
    note: str = ""
    """Where relret deliberately differs, and why."""

    def value_in(self, config: str) -> Any:
        return self.value[config] if isinstance(self.value, dict) else self.value


SETTINGS = [
    Setting("batch size", "32", "xieh97 ex_baseline.py (get_train_data_loader)", "train.global_batch_size", 32),
    Setting("epochs", "25", "xieh97 ex_baseline.py (max_epochs)", "train.epochs", 25),
    Setting("optimizer", "AdamW", "xieh97 ex_baseline.py", "(DeepSpeed optimizer)", "AdamW"),
    Setting("peak learning rate", "2e-5", "xieh97 utils/optim_utils.py (base_lr)", "optim.lr", 2e-5),
    Setting("AdamW betas", "(0.9, 0.999)", "xieh97 ex_baseline.py", "optim.betas", (0.9, 0.999)),
    Setting("AdamW eps", "1e-8", "xieh97 ex_baseline.py", "optim.eps", 1e-8),
    Setting("weight decay", "0.0", "xieh97 ex_baseline.py", "optim.weight_decay", 0.0),
    Setting("linear warm-up", "1 epoch", "xieh97 utils/optim_utils.py (warmup_length)", "optim.warmup_epochs", 1.0),
    Setting(
        "cosine end",
        "epoch 20 (rampdown_start 1, rampdown_stop 20)",
        "xieh97 ex_baseline.py, utils/optim_utils.py",
        "optim.decay_end_epoch",
        20.0,
    ),
    Setting("floor", "1e-7 from epoch 20 to 25", "xieh97 utils/optim_utils.py (min_lr)", "optim.min_lr", 1e-7),
    Setting(
        "schedule steps",
        "every batch, at epoch + batch / batches_per_epoch",
        "xieh97 utils/model_utils.py (train)",
        "(relret.schedule: per optimizer step)",
        "per step",
    ),
    Setting(
        "gradient clipping",
        "none",
        "xieh97 utils/model_utils.py; salsa gradient_clip_val=None",
        "optim.grad_clip",
        None,
    ),
    Setting(
        "precision",
        "fp16 autocast + GradScaler",
        "xieh97 utils/model_utils.py, ex_baseline.py; salsa half_precision",
        "train.precision",
        "fp16",
    ),
    Setting(
        "data parallelism",
        "one GPU (no sharding)",
        "xieh97 utils/model_utils.py (one device); salsa README (one A40)",
        "train.zero_stage",
        0,
        "DeepSpeed data parallel without ZeRO: fp16 loss scaling needs stage 0",
    ),
    Setting(
        "epoch",
        "every caption once (Clotho: 5 x 3,839 = 19,195 items)",
        "xieh97 datasets/clotho_v2.py (__len__)",
        "data.epoch_unit",
        "caption",
    ),
    Setting(
        "training crop",
        "fresh random 30 s (Clotho, WavCaps) / 10 s (AudioCaps) per item",
        "xieh97 utils/data_utils.py, datasets/dataset_base_classes.py",
        "data.crop_s",
        {"pretrain": 30.0, "finetune_clotho": 30.0, "finetune_audiocaps": 10.0},
    ),
    Setting(
        "validation length",
        "30 s (Clotho) / 10 s (AudioCaps)",
        "xieh97 utils/data_utils.py",
        "data.val_crop_s",
        {"pretrain": 30.0, "finetune_clotho": 30.0, "finetune_audiocaps": 10.0},
    ),
    Setting(
        "PaSST",
        "passt_s_p16_s16_128_ap468",
        "xieh97 models.py (get_passt)",
        "model.audio.weights",
        "pretrained/passt-s-f128-p16-s16-ap.468.pt",
    ),
    Setting("PaSST patch stride", "16 x 16", "xieh97 models.py (fstride, tstride)", "model.audio.stride", 16),
    Setting(
        "PaSST width, depth, heads",
        "768, 12, 12",
        "hear21passt passt_s_p16_s16_128_ap468",
        "model.audio.embed_dim, depth, num_heads",
        (768, 12, 12),
    ),
    Setting("PaSST input frames", "1000", "xieh97 models.py (input_tdim)", "model.audio.input_tdim", 1000),
    Setting(
        "audio windows",
        "10 s, hop 10 s, averaged",
        "xieh97 models.py (WindowedPrediction)",
        "model.audio.window_s",
        10.0,
        "relret averages the windows that hold audio; xieh97 also the silent ones of a clip zero-padded to 30 s",
    ),
    Setting(
        "structured patchout, time",
        "15 (training only)",
        "xieh97 models.py; salsa model_config",
        "model.audio.s_patchout_t",
        15,
    ),
    Setting(
        "structured patchout, frequency",
        "2 (training only)",
        "xieh97 models.py; salsa model_config",
        "model.audio.s_patchout_f",
        2,
    ),
    Setting(
        "mel bands, window, hop, FFT",
        "128, 800, 320, 1024",
        "xieh97 models.py (AugmentMelSTFT)",
        "model.audio.n_mels, win_length, hop_length, n_fft",
        (128, 800, 320, 1024),
    ),
    Setting(
        "SpecAugment masks",
        "freqm 0, timem 0",
        "xieh97 models.py (AugmentMelSTFT)",
        "model.audio.freq_mask, time_mask",
        (0, 0),
    ),
    Setting("mel fmin", "0", "xieh97 models.py (AugmentMelSTFT)", "model.audio.fmin", 0.0),
    Setting(
        "mel fmax",
        "None: 16000 - 2000 / 2 = 15000 Hz",
        "xieh97 models.py; hear21passt models/preprocess.py",
        "model.audio.fmax",
        15000.0,
    ),
    Setting(
        "fmin shift in training",
        "fmin_aug_range 10",
        "xieh97 models.py (AugmentMelSTFT)",
        "model.audio.fmin_aug_range",
        10,
    ),
    Setting(
        "fmax shift in training",
        "fmax_aug_range 2000",
        "xieh97 models.py (AugmentMelSTFT)",
        "model.audio.fmax_aug_range",
        2000,
    ),
    Setting(
        "text encoder", "roberta-large", "xieh97 models.py (get_roberta)", "model.text.name_or_path", "roberta-large"
    ),
    Setting(
        "RoBERTa hidden dropout", "0.2", "xieh97 models.py (hidden_dropout_prob)", "model.text.hidden_dropout", 0.2
    ),
    Setting(
        "RoBERTa attention dropout",
        "0.2",
        "xieh97 models.py (attention_probs_dropout_prob)",
        "model.text.attention_dropout",
        0.2,
    ),
    Setting("caption tokens", "32", "xieh97 models.py (text_branch max_length)", "model.text.max_tokens", 32),
    Setting(
        "text pooling",
        "first token ([CLS] / <s>)",
        "xieh97 models.py (text_feats[:, 0, :])",
        "model.text.pooling",
        "cls",
    ),
    Setting(
        "caption preprocessing",
        "xieh97: raw captions; salsa: lower-cased, punctuation removed",
        "xieh97 models.py (text_branch); salsa ex_dcase24.py (remove_punctuation)",
        "model.text.lowercase, strip_punctuation",
        (True, True),
        "salsa's normalisation is kept",
    ),
    Setting(
        "shared space",
        "1024 (Linear-ReLU-Linear heads, hidden 1024)",
        "xieh97 models.py (audio_proj, text_proj)",
        "model.embed_dim, proj_hidden_dim",
        (1024, None),
    ),
    Setting("temperature", "0.05", "xieh97 ex_baseline.py (loss.tau)", "loss.tau", 0.05),
    Setting(
        "Sentence-BERT of the targets",
        "all-mpnet-base-v2 (768-d)",
        "the paper; xieh97 datasets/* read the vectors precomputed (*_sbert.pkl)",
        "data.sbert_dim",
        768,
        "the shards' model: configs/pipeline.yaml writes all-mpnet-base-v2",
    ),
    Setting(
        "relevance g(h)",
        "sigmoid(1.85 - 4.58 (1 - h)) = 1 / (1 + exp(2.73 - 4.58 h))",
        "xieh97 utils/criterion_utils.py (target_func 'rating')",
        "loss.listnet.relevance.a, b",
        (2.73, 4.58),
    ),
    Setting(
        "target temperature",
        "softmax(g / 0.05)",
        "xieh97 utils/criterion_utils.py (tau)",
        "loss.listnet.omega",
        0.05,
    ),
    Setting(
        "model selection",
        "xieh97: lowest validation loss; salsa: highest validation mAP@10",
        "xieh97 ex_baseline.py; salsa ex_dcase24.py (monitor)",
        "train.best_metric",
        "t2a/mAP@10",
        "salsa's choice is kept",
    ),
]


def _get(cfg: TrainConfig, key: str) -> Any:
    """The value of `key` ("a.b.c", or "a.b.c, d, e": several keys of one section) in a resolved config, as its YAML
    spells it (lists as tuples)."""
    head, *more = [k.strip() for k in key.split(",")]
    section, _, first = head.rpartition(".")
    data = reduce(lambda d, k: d[k], section.split("."), to_dict(cfg))
    values = [tuple(v) if isinstance(v, list) else v for v in (data[name] for name in (first, *more))]
    return values[0] if not more else tuple(values)


def paper_config(name: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / f"{name}.yaml")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_holds_every_setting_of_the_table(name):
    """Each row with a config key: the resolved paper config holds the relret value of the table."""
    cfg = paper_config(name)
    checked = 0
    for row in SETTINGS:
        if row.key.startswith("("):  # not a single key: checked by the tests below
            continue
        assert _get(cfg, row.key) == row.value_in(name), f"{name}: {row.setting} ({row.key})"
        checked += 1
    assert checked == len(SETTINGS) - 2


def markdown_table() -> str:
    """The table for the README: setting | authors' value | source | relret key | relret value."""
    lines = ["| setting | authors' value | source | relret key | relret value |", "|---|---|---|---|---|"]
    for row in SETTINGS:
        if isinstance(row.value, dict):
            value = ", ".join(f"{_text(v)} ({k.removeprefix('finetune_')})" for k, v in row.value.items())
        elif isinstance(row.value, tuple):
            value = ", ".join(_text(v) for v in row.value)
        else:
            value = _text(row.value)
        if row.note:
            value += f" ({row.note})"
        key = row.key if row.key.startswith("(") else f"`{row.key}`"
        lines.append(f"| {row.setting} | {row.authors} | {row.source} | {key} | {value} |")
    return "\n".join(lines)


def _text(value: Any) -> str:
    """A value as the YAML config spells it (null, true, 2e-5, 30)."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:g}".replace("e-0", "e-")
    return str(value)


def authors_lr(epoch: np.ndarray) -> np.ndarray:
    """The authors' learning rate at fractional epochs (utils/optim_utils.update_lr with the defaults of
    ex_baseline.py: 2e-5, warm-up 1, cosine from 1 to 20, floor 1e-7), evaluated with numpy."""
    lr, min_lr, warmup, end = 2e-5, 1e-7, 1.0, 20.0
    cosine = min_lr + (lr - min_lr) * (1 + np.cos(np.pi * (epoch - warmup) / (end - warmup))) / 2
    return np.where(epoch < warmup, lr * epoch / warmup, np.where(epoch < end, cosine, min_lr))


def test_clotho_epoch_is_every_caption_once_and_follows_the_authors_curve(shared_data):
    """Clotho development's captions (the real csv: 3,839 clips x 5) make an epoch of 19,195 samples, 599 steps of
    32; the paper config's learning rate over the 14,975 steps is the authors' at epoch (step + 1) / 599."""
    from relret.schedule import WarmupCosine
    from relret.trainer import make_plan

    with (shared_data / "clotho" / "clotho_captions_development.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    captions = sum(1 for row in rows for k, v in row.items() if k.startswith("caption_") and v.strip())
    assert (len(rows), captions) == (3839, 19195)
    cfg = paper_config("finetune_clotho")
    plan = make_plan(cfg, world_size=4, total_train_samples=captions, device_type="cuda")
    assert (plan.steps_per_epoch, plan.warmup_steps, plan.decay_end_steps, plan.total_steps) == (599, 599, 11980, 14975)
    assert (plan.micro_batch_size, plan.precision) == (8, "fp16")
    schedule = WarmupCosine(plan.total_steps, plan.warmup_steps, cfg.optim.lr, cfg.optim.min_lr, plan.decay_end_steps)
    got = np.array([schedule(u) * cfg.optim.lr for u in range(plan.total_steps)])
    np.testing.assert_allclose(got, authors_lr((np.arange(plan.total_steps) + 1) / 599), rtol=1e-12, atol=1e-20)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_deepspeed_config_is_fp16_autocast_without_clipping(name):
    """On CUDA the paper configs give DeepSpeed AdamW(2e-5, (0.9, 0.999), 1e-8, no weight decay), no clipping, fp16
    autocast (the GradScaler) and ZeRO 0; on CPU they are refused before any work."""
    from relret.config import ConfigError
    from relret.trainer import deepspeed_config, make_plan

    cfg = paper_config(name)
    ds = deepspeed_config(cfg, make_plan(cfg, 4, 19195, device_type="cuda"))
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True},
    }
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"] == {"stage": 0}
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "float16"} and "fp16" not in ds
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a CUDA GPU"):
        make_plan(cfg, 4, 19195, device_type="cpu")


def test_paper_front_end_and_patchout_are_the_authors():
    """The paper audio config (one block, to stay small) computes the log-mel of hear21passt's AugmentMelSTFT with the
    authors' arguments, and its 10 s window's 8 x 62 patch grid keeps 6 x 47 patches in training, all in evaluation."""
    from hear21passt.models.preprocess import AugmentMelSTFT

    from relret.models import PaSSTEncoder

    audio = dataclasses.replace(paper_config("finetune_clotho").model.audio, depth=1, weights=None)
    encoder = PaSSTEncoder(audio)
    reference = AugmentMelSTFT(
        n_mels=128, sr=32000, win_length=800, hopsize=320, n_fft=1024, freqm=0, timem=0, htk=False, fmin=0.0,
        fmax=None, norm=1, fmin_aug_range=10, fmax_aug_range=2000,
    ).eval()  # fmt: skip
    window = torch.from_numpy(np.random.default_rng(0).uniform(-0.5, 0.5, (1, 320_000)).astype(np.float32))
    tokens = []
    encoder.passt.blocks.register_forward_pre_hook(lambda module, args: tokens.append(args[0].shape[1]))
    with torch.no_grad():
        mel = encoder.eval().spectrogram(window)[:, 0]
        torch.testing.assert_close(mel, reference(window)[..., :1000], rtol=0, atol=0)
        encoder.embed_windows(window)
        encoder.train().embed_windows(window)
    assert tokens == [2 + 8 * 62, 2 + (8 - 2) * (62 - 15)]


def test_paper_roberta_dropout_is_in_the_built_config():
    """The paper text config's dropouts reach the RoBERTa config (a small random RoBERTa: roberta-large is not
    available offline; the loading path is tested in test_models)."""
    from relret.models.text import TextEncoder

    text = dataclasses.replace(
        paper_config("pretrain").model.text,
        tokenizer="minilm", random_init=True, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
    )  # fmt: skip
    config = TextEncoder(text).model.config
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (0.2, 0.2)
