"""The dual encoder: PaSST windows pooled with a mask, caption normalisation and truncation, heads, weights files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from relret.config import AudioEncoderConfig, ConfigError, ModelConfig, TextEncoderConfig
from relret.models import PaSSTEncoder, build_model
from relret.models.text import normalise_caption

SR = 32_000
TINY_AUDIO = AudioEncoderConfig(embed_dim=16, depth=1, num_heads=2, window_s=1.0, input_tdim=98)
TINY_TEXT = TextEncoderConfig(
    tokenizer="minilm", random_init=True, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_tokens=12
)


@pytest.fixture(scope="module")
def audio_encoder() -> PaSSTEncoder:
    torch.manual_seed(0)
    return PaSSTEncoder(TINY_AUDIO).eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(audio=TINY_AUDIO, text=TINY_TEXT, embed_dim=8, proj_hidden_dim=12)).eval()


def _reference_clip_embedding(encoder: PaSSTEncoder, clip: np.ndarray) -> np.ndarray:
    """A clip's embedding the plain way: cut into 1 s windows, zero-pad the last, embed each alone, average."""
    ws = SR
    n = -(-len(clip) // ws)
    padded = np.zeros(n * ws, dtype=np.float32)
    padded[: len(clip)] = clip
    with torch.no_grad():
        rows = [encoder.embed_windows(torch.from_numpy(padded[i * ws : (i + 1) * ws])[None])[0] for i in range(n)]
    return torch.stack(rows).mean(dim=0).numpy()


def test_window_pooling_matches_per_window_reference(audio_encoder):
    """Clips of 0.5, 1.7 and 3 s in one padded batch embed as the mean of their own windows, each computed alone."""
    rng = np.random.default_rng(0)
    lengths = [SR // 2, int(1.7 * SR), 3 * SR]
    clips = [rng.uniform(-0.5, 0.5, n).astype(np.float32) for n in lengths]
    batch = np.zeros((3, max(lengths)), dtype=np.float32)
    for i, c in enumerate(clips):
        batch[i, : len(c)] = c
    with torch.no_grad():
        got = audio_encoder(torch.from_numpy(batch), torch.tensor(lengths)).numpy()
    for i, c in enumerate(clips):
        np.testing.assert_allclose(got[i], _reference_clip_embedding(audio_encoder, c), rtol=1e-4, atol=1e-5)


def test_padding_never_counts(audio_encoder):
    """Extra windows of padding, and junk written after a clip's length, leave its embedding unchanged."""
    rng = np.random.default_rng(1)
    clip = rng.uniform(-0.5, 0.5, int(1.5 * SR)).astype(np.float32)
    short = torch.from_numpy(clip)[None]
    long = torch.from_numpy(np.concatenate([clip, rng.uniform(-1, 1, 3 * SR).astype(np.float32)]))[None]
    with torch.no_grad():
        a = audio_encoder(short, torch.tensor([len(clip)]))
        b = audio_encoder(long, torch.tensor([len(clip)]))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        c = audio_encoder(long, torch.tensor([long.shape[1]]))
    assert (a - c).abs().max() > 1e-3  # the same call does see audio that is inside the length


def test_only_windows_with_audio_are_computed(audio_encoder):
    """A batch padded to 4 windows runs PaSST on the 1 + 2 + 4 windows that hold audio, not on 12."""
    windows = []
    orig = audio_encoder.passt.forward_features
    audio_encoder.passt.forward_features = lambda x: (windows.append(x.shape[0]), orig(x))[1]
    try:
        with torch.no_grad():
            audio_encoder(torch.zeros(3, 4 * SR), torch.tensor([SR // 3, SR + 1, 4 * SR]))
    finally:
        audio_encoder.passt.forward_features = orig
    assert windows == [7]


def test_spectrogram_has_passt_input_shape(audio_encoder):
    """One window gives [1, 1, n_mels, input_tdim] log-mels, finite."""
    mel = audio_encoder.spectrogram(torch.zeros(1, SR) + 0.01)
    assert mel.shape == (1, 1, 128, 98) and torch.isfinite(mel).all()


@pytest.mark.parametrize(
    "text, lower, strip, want",
    [
        ("A Dog's bark, LOUD!", True, True, "a dogs bark loud"),
        ("A Dog's bark, LOUD!", False, True, "A Dogs bark LOUD"),
        ("A Dog's bark, LOUD!", True, False, "a dog's bark, loud!"),
        ("  rain --  on a   roof. ", True, True, "rain on a roof"),
    ],
)
def test_caption_normalisation(text, lower, strip, want):
    """Lower-casing and punctuation removal are applied as configured, spaces collapsed."""
    assert normalise_caption(text, lower, strip) == want


def test_captions_are_cut_at_max_tokens(model):
    """A 40-word caption becomes max_tokens tokens (special tokens included); short ones are padded with a mask."""
    tokens = model.text_encoder.tokenize(["word " * 40, "a dog"])
    assert tokens["input_ids"].shape == (2, 12)
    assert tokens["attention_mask"].sum(dim=1).tolist() == [12, 4]  # [CLS] a dog [SEP]


def test_heads_are_linear_relu_linear_into_the_shared_space(model):
    """Both heads are Linear(in, hidden)-ReLU-Linear(hidden, embed_dim) and the outputs are [B, embed_dim]."""
    for head, in_dim in ((model.audio_proj, 16), (model.text_proj, 16)):
        kinds = [type(m).__name__ for m in head]
        assert kinds == ["Linear", "ReLU", "Linear"]
        assert (head[0].in_features, head[0].out_features, head[2].out_features) == (in_dim, 12, 8)
    with torch.no_grad():
        a, t = model(torch.zeros(2, SR) + 0.01, torch.tensor([SR, SR // 2]), ["a dog", "rain"])
        an = model.encode_audio(torch.zeros(2, SR) + 0.01, torch.tensor([SR, SR // 2]), normalize=True)
    assert a.shape == t.shape == (2, 8)
    torch.testing.assert_close(an.norm(dim=1), torch.ones(2))


def test_passt_weights_file_round_trip(tmp_path, audio_encoder):
    """A local .pt state dict (with AudioSet heads, as released) loads into the encoder; a wrong size is refused."""
    state = {k: v.clone() for k, v in audio_encoder.passt.state_dict().items()}
    state["head.1.weight"] = torch.zeros(527, 16)  # released checkpoints carry classifier heads: ignored
    torch.save(state, tmp_path / "passt.pt")
    torch.manual_seed(123)
    loaded = PaSSTEncoder(dataclasses.replace(TINY_AUDIO, weights=str(tmp_path / "passt.pt")))
    for k, v in audio_encoder.passt.state_dict().items():
        torch.testing.assert_close(loaded.passt.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit the configured PaSST"):
        PaSSTEncoder(dataclasses.replace(TINY_AUDIO, embed_dim=32, weights=str(tmp_path / "passt.pt")))
    with pytest.raises(ValueError, match="model.audio.weights: no file"):
        PaSSTEncoder(dataclasses.replace(TINY_AUDIO, weights=str(tmp_path / "missing.pt")))


def test_audio_config_refuses_windows_too_short_for_input_tdim():
    """input_tdim longer than a window's frames is refused naming both keys."""
    with pytest.raises(ConfigError, match="model.audio.input_tdim=998 does not fit a 1.0 s window"):
        AudioEncoderConfig(window_s=1.0)
