import json

import numpy as np
import soundfile as sf
from scipy.stats import spearmanr

from shards import synth
from shards.readers import read_clotho


def test_corpus_has_clothos_layout_and_is_reproducible(tmp_path):
    """The CSV reads as Clotho (five distinct captions per clip), WAVs have the requested lengths and rate, and clip i
    depends only on (seed, i): a shorter corpus is a byte-identical prefix of a longer one."""
    big = synth.write_corpus(tmp_path / "big", clips=12, seed=5, min_s=1.0, max_s=1.5, sample_rate_hz=22050)
    small = synth.write_corpus(tmp_path / "small", clips=5, seed=5, min_s=1.0, max_s=1.5, sample_rate_hz=22050)
    other = synth.write_corpus(tmp_path / "other", clips=5, seed=6, min_s=1.0, max_s=1.5, sample_rate_hz=22050)
    catalog = read_clotho(big)
    assert len(catalog.clips) == 12 and catalog.skipped == []
    assert all(len(set(c.captions)) == 5 for c in catalog.clips)
    for clip in catalog.clips:
        info = sf.info(tmp_path / "big/development" / clip.audio_path)
        assert info.samplerate == 22050 and info.channels == 1 and 1.0 <= info.duration <= 1.5
    for name in ("scene_000000.wav", "scene_000004.wav"):
        wav = {k: (tmp_path / k / "development" / name).read_bytes() for k in ("big", "small", "other")}
        assert wav["big"] == wav["small"] != wav["other"]
    assert small.read_text().splitlines() == big.read_text().splitlines()[:6]
    assert other.read_text() != small.read_text()


def _band_profile(path) -> np.ndarray:
    """Normalised log energy in 24 log-spaced bands: a crude, independent description of how a clip sounds."""
    x, rate = sf.read(path)
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    edges = np.geomspace(40, 16000, 25)
    v = np.log([power[(freqs >= lo) & (freqs < hi)].sum() + 1e-9 for lo, hi in zip(edges[:-1], edges[1:])])
    v -= v.mean()
    return v / np.linalg.norm(v)


def test_caption_similarity_tells_which_clips_sound_alike(tmp_path, sbert_model):
    """Across clip pairs, SBERT similarity of the captions rises with the overlap of event types, and so does the
    similarity of the audio spectra: captions carry real information about the sound."""
    captions_csv = synth.write_corpus(tmp_path, clips=80, seed=11, min_s=1.0, max_s=2.0)
    scenes = json.loads((tmp_path / "scenes_development.json").read_text())
    clips = read_clotho(captions_csv).clips
    emb = np.stack([sbert_model.encode(list(c.captions), normalize_embeddings=True).mean(axis=0) for c in clips])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    audio = np.stack([_band_profile(tmp_path / "development" / c.audio_path) for c in clips])
    types = [{e["type"] for e in scenes[c.source]} for c in clips]
    i, j = np.triu_indices(len(clips), 1)
    overlap = np.array([len(types[a] & types[b]) / len(types[a] | types[b]) for a, b in zip(i, j)])
    caption_sim = (emb @ emb.T)[i, j]
    audio_sim = (audio @ audio.T)[i, j]
    assert spearmanr(overlap, caption_sim).correlation > 0.6
    assert spearmanr(overlap, audio_sim).correlation > 0.2
    same, disjoint = overlap == 1, overlap == 0
    assert caption_sim[same].mean() > caption_sim[disjoint].mean() + 0.2
    assert audio_sim[same].mean() > audio_sim[disjoint].mean() + 0.2
