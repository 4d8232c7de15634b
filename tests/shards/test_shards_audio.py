import numpy as np
import pytest
import soundfile as sf

from relret.audio import BadAudio, load_clip, max_samples
from relret.shard_format import SAMPLE_RATE_HZ, decode_flac, encode_flac


def _tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.5 * np.sin(2 * np.pi * freq * t + k) for k in range(channels)], axis=1)


@pytest.mark.parametrize("rate", [8000, 22050, 32000, 44100, 48000, 96000])
def test_resampled_tone_matches_the_analytic_signal(tmp_path, rate):
    """A 440 Hz tone at any input rate comes out as the same tone sampled at 32 kHz (length round(n*32000/rate))."""
    path = tmp_path / f"t{rate}.flac"
    sf.write(path, _tone(1.3, rate), rate, subtype="PCM_24")
    audio = load_clip(str(path), 30.0)
    assert audio.dtype == np.float32
    assert len(audio) == round(int(1.3 * rate) * SAMPLE_RATE_HZ / rate)
    t = np.arange(len(audio)) / SAMPLE_RATE_HZ
    middle = slice(1000, -1000)  # away from the filter's start-up and end
    np.testing.assert_allclose(audio[middle], 0.5 * np.sin(2 * np.pi * 440 * t)[middle], atol=2e-3)


def test_channels_are_averaged(tmp_path):
    """Stereo becomes the mean of its channels (here two tones with a phase offset)."""
    stereo = _tone(0.5, SAMPLE_RATE_HZ, channels=2)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, SAMPLE_RATE_HZ, subtype="FLOAT")
    np.testing.assert_allclose(load_clip(str(path), 30.0), stereo.mean(axis=1), atol=1e-6)


def test_crop_equals_the_start_of_the_full_clip(tmp_path):
    """Cropping decodes only the start, yet gives exactly the first samples of the uncropped resampled clip."""
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.wav"
    sf.write(path, 0.2 * rng.standard_normal(44100 * 4), 44100, subtype="PCM_16")
    full = load_clip(str(path), 30.0)
    cropped = load_clip(str(path), 1.5)
    assert len(cropped) == max_samples(1.5) == 48000
    np.testing.assert_allclose(cropped, full[:48000], atol=1e-6)


def test_flac_round_trip_is_16_bit(tmp_path):
    """What the shard stores decodes to the clip within 16-bit quantisation."""
    sf.write(tmp_path / "a.wav", _tone(0.7, 44100), 44100)
    audio = load_clip(str(tmp_path / "a.wav"), 30.0)
    decoded, rate = decode_flac(encode_flac(audio))
    assert rate == SAMPLE_RATE_HZ
    np.testing.assert_allclose(decoded, audio, atol=1 / 32767 + 1e-7)


def test_bad_audio_reasons(tmp_path):
    """Missing, empty, garbage, truncated WAV/FLAC and sample-less files raise BadAudio with the reason."""
    sf.write(tmp_path / "ok.wav", _tone(1.0, 44100), 44100, subtype="PCM_16")
    sf.write(tmp_path / "ok.flac", _tone(1.0, 44100), 44100, subtype="PCM_16")
    wav, flac = (tmp_path / "ok.wav").read_bytes(), (tmp_path / "ok.flac").read_bytes()
    (tmp_path / "cut.wav").write_bytes(wav[: len(wav) // 2])
    (tmp_path / "cut.flac").write_bytes(flac[: len(flac) // 2])
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.wav").write_bytes(b"RIFF" + bytes(100))
    sf.write(tmp_path / "none.wav", np.zeros(0), 44100, subtype="PCM_16")
    cases = {
        "missing.wav": "audio file not found",
        "empty.wav": r"audio file is empty \(0 bytes\)",
        "junk.wav": r"audio file unreadable \(",
        "cut.wav": r"audio file is truncated \(data chunk has 44\d\d\d of 88200 bytes\)",
        "cut.flac": r"audio file unreadable \(.*lost sync|audio file is truncated",
        "none.wav": "audio file holds no samples",
    }
    for name, reason in cases.items():
        with pytest.raises(BadAudio, match=reason):
            load_clip(str(tmp_path / name), 30.0)
    assert len(load_clip(str(tmp_path / "ok.wav"), 30.0)) == 32000


def test_no_limit_reads_the_whole_file(tmp_path):
    """max_duration_s=None returns the whole file, resampled (length by soxr's rule)."""
    sf.write(tmp_path / "long.wav", np.zeros(44100 * 3, dtype=np.float32), 44100)
    assert len(load_clip(str(tmp_path / "long.wav"), None)) == 96000
    assert len(load_clip(str(tmp_path / "long.wav"), 1.0)) == 32000
