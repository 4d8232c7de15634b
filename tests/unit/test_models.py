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


# The authors' log-mel front end: hear21passt's AugmentMelSTFT exactly as xieh97/text-audio-retrieval models.py builds it.
AUTHORS_MEL = dict(
    n_mels=128, sr=SR, win_length=800, hopsize=320, n_fft=1024, freqm=0, timem=0, htk=False, fmin=0.0, fmax=None,
    norm=1, fmin_aug_range=10, fmax_aug_range=2000,
)  # fmt: skip
PAPER_MEL = dict(fmin=0.0, fmax=15000.0, fmin_aug_range=10, fmax_aug_range=2000, freq_mask=0, time_mask=0)


def _hear21passt_mel(**kwargs):
    from hear21passt.models.preprocess import AugmentMelSTFT

    return AugmentMelSTFT(**kwargs)


@pytest.mark.parametrize("fmax", [15000.0, None])
def test_mel_front_end_equals_hear21passts_with_the_authors_arguments(fmax):
    """With the paper's mel fields (fmax 15000, or null for hear21passt's own default) the encoder's spectrogram equals
    hear21passt's AugmentMelSTFT built with the authors' arguments: in evaluation (fmin 0, fmax 15000, no shift),
    and in training under the same seed (the same random fmin/fmax shifts)."""
    cfg = dataclasses.replace(TINY_AUDIO, **{**PAPER_MEL, "fmax": fmax})
    encoder = PaSSTEncoder(cfg)
    reference = _hear21passt_mel(**AUTHORS_MEL)
    windows = torch.from_numpy(np.random.default_rng(2).uniform(-0.5, 0.5, (3, SR)).astype(np.float32))
    with torch.no_grad():
        encoder.eval(), reference.eval()
        got = encoder.spectrogram(windows)[:, 0]
        want = reference(windows)[..., : cfg.input_tdim]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        encoder.train(), reference.train()
        torch.manual_seed(5)
        got_train = encoder.spectrogram(windows)[:, 0]
        torch.manual_seed(5)
        want_train = reference(windows)[..., : cfg.input_tdim]
    torch.testing.assert_close(got_train, want_train, rtol=0, atol=0)
    assert (got_train - got).abs().max() > 1e-3  # training really shifted the filters


def test_default_mel_front_end_is_the_unshifted_full_band_one():
    """The defaults (fmin 0, fmax 16000, ranges 1: no shift) give hear21passt's front end with those arguments, the
    same in training as in evaluation: what relret computed before the fields existed."""
    encoder = PaSSTEncoder(TINY_AUDIO)
    reference = _hear21passt_mel(
        n_mels=128, sr=SR, win_length=800, hopsize=320, n_fft=1024, freqm=0, timem=0, fmin=0.0, fmax=SR // 2,
        fmin_aug_range=1, fmax_aug_range=1,
    ).eval()  # fmt: skip
    windows = torch.from_numpy(np.random.default_rng(3).uniform(-0.5, 0.5, (2, SR)).astype(np.float32))
    with torch.no_grad():
        want = reference(windows)[..., : TINY_AUDIO.input_tdim]
        torch.testing.assert_close(encoder.eval().spectrogram(windows)[:, 0], want, rtol=0, atol=0)
        torch.testing.assert_close(encoder.train().spectrogram(windows)[:, 0], want, rtol=0, atol=0)


def test_mel_band_past_nyquist_is_refused():
    """fmax plus half its random range beyond 16 kHz is refused naming the keys (hear21passt would fail mid-training)."""
    with pytest.raises(ValueError, match=r"model.audio.fmax=16000.0 with model.audio.fmax_aug_range=2000: .* 17000 Hz"):
        PaSSTEncoder(dataclasses.replace(TINY_AUDIO, fmax=16000.0, fmax_aug_range=2000))
    with pytest.raises(ConfigError, match=r"model.audio.fmin_aug_range must be >= 1"):
        dataclasses.replace(TINY_AUDIO, fmin_aug_range=0)


def _tokens_into_blocks(encoder: PaSSTEncoder, windows: torch.Tensor) -> int:
    seen = []
    handle = encoder.passt.blocks.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            encoder.embed_windows(windows)
    finally:
        handle.remove()
    return seen[0]


def test_patchout_drops_time_columns_and_frequency_rows_in_training_only():
    """A 1 s window at 128 mels is an 8 x 6 patch grid; s_patchout_t=2, s_patchout_f=3 leave 5 x 4 patches (+ the
    class and distillation tokens) in training and all 48 in evaluation."""
    encoder = PaSSTEncoder(dataclasses.replace(TINY_AUDIO, s_patchout_t=2, s_patchout_f=3))
    windows = torch.zeros(2, SR) + 0.01
    assert _tokens_into_blocks(encoder.eval(), windows) == 2 + 8 * 6
    torch.manual_seed(0)
    assert _tokens_into_blocks(encoder.train(), windows) == 2 + (8 - 3) * (6 - 2)
    assert _tokens_into_blocks(PaSSTEncoder(TINY_AUDIO).train(), windows) == 2 + 8 * 6  # default: no patchout


def test_text_dropout_fields_reach_the_roberta_config(tmp_path):
    """hidden_dropout and attention_dropout are the built RoBERTa's hidden_dropout_prob and
    attention_probs_dropout_prob, for a random model and for one loaded from a directory; the defaults are 0.1."""
    from transformers import RobertaModel

    from relret.models.text import TextEncoder

    random_model = TextEncoder(dataclasses.replace(TINY_TEXT, hidden_dropout=0.2, attention_dropout=0.3)).model
    assert (random_model.config.hidden_dropout_prob, random_model.config.attention_probs_dropout_prob) == (0.2, 0.3)
    assert random_model.embeddings.dropout.p == 0.2
    default = TextEncoder(TINY_TEXT).model.config
    assert (default.hidden_dropout_prob, default.attention_probs_dropout_prob) == (0.1, 0.1)
    random_model.save_pretrained(tmp_path / "roberta")  # a "pretrained" model whose own dropouts are 0.2 and 0.3
    loaded = TextEncoder(
        dataclasses.replace(TINY_TEXT, random_init=False, name_or_path=str(tmp_path / "roberta"), hidden_dropout=0.25)
    ).model
    assert isinstance(loaded, RobertaModel)
    assert (loaded.config.hidden_dropout_prob, loaded.config.attention_probs_dropout_prob) == (0.25, 0.1)
    torch.testing.assert_close(loaded.embeddings.word_embeddings.weight, random_model.embeddings.word_embeddings.weight)


def test_legacy_text_dropout_key_sets_both_fields():
    """`model.text.dropout` (the single field of configs saved before) still reads, as both dropouts; null keeps the
    defaults; given together with one of the new fields it is refused naming both."""
    from relret.config import TrainConfig, load_config

    text = load_config(TrainConfig, None, ["model.text.dropout=0"]).model.text
    assert (text.hidden_dropout, text.attention_dropout) == (0.0, 0.0)
    text = load_config(TrainConfig, None, ["model.text.dropout=null"]).model.text
    assert (text.hidden_dropout, text.attention_dropout) == (0.1, 0.1)
    with pytest.raises(ConfigError, match=r"model.text.dropout and model.text.hidden_dropout are both set"):
        load_config(TrainConfig, None, ["model.text.dropout=0.3", "model.text.hidden_dropout=0.2"])


def _encoder_run(encoder: PaSSTEncoder, audio: torch.Tensor, lengths: torch.Tensor, seed: int = 11):
    """Embeddings [B, E] and every parameter's gradient of a fixed weighted sum of them."""
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # patchout and drop path draw from torch's global RNG
    emb = encoder(audio, lengths)
    (emb * torch.linspace(-1, 1, emb.numel()).view_as(emb)).sum().backward()
    return emb.detach(), {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_attention_switch_gives_the_same_encoder(train):
    """model.audio.attention fused and reference, with the same weights, give the same embeddings and gradients
    (float32 tolerance; patchout and drop path on in training) and the same state-dict keys."""
    from hear21passt.models.passt import Attention

    from relret.models.attention import FusedAttention

    cfg = dataclasses.replace(TINY_AUDIO, depth=2, s_patchout_t=2, s_patchout_f=1, drop_path_rate=0.2)
    torch.manual_seed(0)
    fused = PaSSTEncoder(cfg).train(train)
    reference = PaSSTEncoder(dataclasses.replace(cfg, attention="reference")).train(train)
    assert [type(b.attn) for b in fused.passt.blocks] == [FusedAttention] * 2
    assert [type(b.attn) for b in reference.passt.blocks] == [Attention] * 2
    assert list(reference.state_dict()) == list(fused.state_dict())
    reference.load_state_dict(fused.state_dict(), strict=True)
    rng = np.random.default_rng(4)
    audio = torch.from_numpy(rng.uniform(-0.5, 0.5, (3, 2 * SR)).astype(np.float32))
    lengths = torch.tensor([SR // 2, 2 * SR, int(1.5 * SR)])
    emb_f, grads_f = _encoder_run(fused, audio, lengths)
    emb_r, grads_r = _encoder_run(reference, audio, lengths)
    torch.testing.assert_close(emb_f, emb_r, rtol=1e-4, atol=1e-5)
    assert grads_f.keys() == grads_r.keys() and len(grads_f) > 20
    for name in grads_r:
        torch.testing.assert_close(
            grads_f[name], grads_r[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    if train:  # the seed matters (patchout and drop path are live), so equal runs are not trivially equal
        assert (_encoder_run(fused, audio, lengths, seed=12)[0] - emb_f).abs().max() > 1e-4


def test_attention_switch_defaults_to_fused_and_refuses_other_names():
    """The default is fused (also when a YAML config leaves the key out); another name is refused naming the key and
    the registered names."""
    from relret.config import TrainConfig, load_config

    assert AudioEncoderConfig().attention == "fused"
    assert load_config(TrainConfig, None, []).model.audio.attention == "fused"
    assert load_config(TrainConfig, None, ["model.audio.attention=reference"]).model.audio.attention == "reference"
    with pytest.raises(ConfigError, match=r"model.audio.attention: expected one of 'fused', 'reference', got 'flash'"):
        load_config(TrainConfig, None, ["model.audio.attention=flash"])
    with pytest.raises(ConfigError, match=r"model.audio.attention: expected one of 'fused', 'reference', got None"):
        AudioEncoderConfig(attention=None)


def test_reference_encoder_loads_a_fused_encoders_state_dict_and_back(tmp_path):
    """A checkpoint saved with either attention loads strictly into the other (the same keys): no conversion."""
    torch.manual_seed(0)
    fused = PaSSTEncoder(TINY_AUDIO).eval()
    torch.save(fused.passt.state_dict(), tmp_path / "fused.pt")
    torch.manual_seed(1)
    reference = PaSSTEncoder(dataclasses.replace(TINY_AUDIO, attention="reference", weights=str(tmp_path / "fused.pt")))
    audio = torch.zeros(2, SR) + torch.linspace(-0.3, 0.3, SR)
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(audio), fused(audio), rtol=1e-4, atol=1e-5)
