"""PaSST audio encoder (hear21passt), built offline, over 10 s windows mean-pooled with a mask.

    encoder = PaSSTEncoder(AudioEncoderConfig())           # PaSST-S, no patch overlap, random init
    emb = encoder(audio [B, T] float32 at 32 kHz, audio_len [B] valid samples)   # -> [B, embed_dim]

A clip is cut into windows of `window_s` seconds (the last one zero-padded); each window gets a log-mel spectrogram
(hear21passt's AugmentMelSTFT with the configured fmin/fmax and their training-time random shifts, always in
float32) and a PaSST embedding (the mean of its class and distillation tokens, as PaSST's own forward does; in
training, structured patchout drops `s_patchout_t` time columns and `s_patchout_f` frequency rows of the patch grid),
and the clip's embedding is the mean over the windows that hold any of the clip's samples. Windows made only of padding are never
computed, so padding a batch to a longer clip never changes a clip's embedding.

The model is built from `hear21passt.models.passt.PaSST` directly: its `get_basic_model()` helper always downloads
weights. Pretrained weights (e.g. `passt-s-f128-p16-s16-ap.468.pt` from the PaSST releases) are read from a local
file when `weights` names one, with `torch.load(weights_only=True)` or safetensors. The blocks' attention is then
swapped per `attention` (fused by default: `relret.models.attention.FusedAttention`, on
`scaled_dot_product_attention`), and with `activation_checkpointing` each block recomputes its activations in
backward; neither changes a parameter or a state-dict key.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn

import relret  # noqa: F401  (compatibility step before hear21passt imports torchaudio/timm)
from relret.config import PASST_ATTENTION, AudioEncoderConfig
from relret.models.attention import checkpoint_passt_blocks
from relret.shard_format import SAMPLE_RATE_HZ

# hear21passt's front end uses APIs torch now deprecates; filtered once here (a catch_warnings block per forward
# would reset Python's "warn once" registry for every other warning in the process).
warnings.filterwarnings("ignore", message=r".*return_complex=False.*", category=UserWarning)
warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast.*", category=FutureWarning)


class PaSSTEncoder(nn.Module):
    """Clip embeddings [B, embed_dim] from 32 kHz mono audio [B, T] with masked mean pooling over windows."""

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        from hear21passt.models import passt as passt_module
        from hear21passt.models.preprocess import AugmentMelSTFT

        passt_module.first_RUN = False  # stops hear21passt printing tensor shapes on the first forward
        self.cfg = cfg
        self.output_dim = cfg.embed_dim
        self.mel = AugmentMelSTFT(
            n_mels=cfg.n_mels,
            sr=SAMPLE_RATE_HZ,
            win_length=cfg.win_length,
            hopsize=cfg.hop_length,
            n_fft=cfg.n_fft,
            freqm=cfg.freq_mask,
            timem=cfg.time_mask,
            fmin=cfg.fmin,
            fmax=mel_fmax(cfg),  # given explicitly: hear21passt prints a warning when it derives it
            fmin_aug_range=cfg.fmin_aug_range,
            fmax_aug_range=cfg.fmax_aug_range,
        )
        self.passt = passt_module.PaSST(
            img_size=(cfg.n_mels, cfg.input_tdim),
            patch_size=cfg.patch_size,
            stride=(cfg.stride, cfg.stride),
            in_chans=1,
            num_classes=0,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            distilled=True,
            drop_path_rate=cfg.drop_path_rate,
            s_patchout_t=cfg.s_patchout_t,
            s_patchout_f=cfg.s_patchout_f,
        )
        # The AudioSet classifier heads are not used (embeddings come from forward_features): drop them so that
        # no parameter goes without a gradient.
        self.passt.head = nn.Identity()
        self.passt.head_dist = None
        if cfg.weights is not None:
            load_passt_weights(self.passt, cfg.weights)
        # After the weights, though either order works: the swaps keep every state-dict key, so a relret checkpoint
        # loaded later fits too.
        PASST_ATTENTION.get(cfg.attention)(self.passt)
        if cfg.activation_checkpointing:
            checkpoint_passt_blocks(self.passt)

    def spectrogram(self, windows: torch.Tensor) -> torch.Tensor:
        """Log-mel [N, 1, n_mels, input_tdim] of windows [N, window_samples], always computed in float32."""
        with torch.autocast(device_type=windows.device.type, enabled=False):
            mel = self.mel(windows.float())
        frames = mel.shape[-1]
        if frames >= self.cfg.input_tdim:
            mel = mel[..., : self.cfg.input_tdim]
        else:
            mel = nn.functional.pad(mel, (0, self.cfg.input_tdim - frames), value=float(mel.min()))
        return mel.unsqueeze(1)

    def embed_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """[N, window_samples] -> [N, embed_dim]: mean of PaSST's class and distillation token outputs."""
        cls_token, dist_token = self.passt.forward_features(self.spectrogram(windows))
        return (cls_token + dist_token) / 2

    def window_mask(self, audio_len: torch.Tensor, n_windows: int) -> torch.Tensor:
        """[B, n_windows] True where a window holds at least one of the clip's samples (window 0 always)."""
        starts = torch.arange(n_windows, device=audio_len.device) * self.cfg.window_samples
        mask = audio_len[:, None] > starts[None, :]
        mask[:, 0] = True
        return mask

    def forward(self, audio: torch.Tensor, audio_len: torch.Tensor | None = None) -> torch.Tensor:
        """audio [B, T] float at 32 kHz, audio_len [B] valid samples (default: T) -> [B, embed_dim]."""
        if audio.dim() != 2:
            raise ValueError(f"audio must be [B, T], got shape {tuple(audio.shape)}")
        batch, length = audio.shape
        if audio_len is None:
            audio_len = torch.full((batch,), length, dtype=torch.long, device=audio.device)
        ws = self.cfg.window_samples
        # Whatever lies beyond a clip's length is padding: zero it, so a partly filled window sees silence.
        valid = torch.arange(length, device=audio.device)[None, :] < audio_len.to(audio.device)[:, None]
        audio = audio * valid
        n_windows = max(1, math.ceil(length / ws))
        if n_windows * ws != length:
            audio = nn.functional.pad(audio, (0, n_windows * ws - length))
        mask = self.window_mask(audio_len.to(audio.device), n_windows)  # [B, W]
        windows = audio.reshape(batch * n_windows, ws)[mask.reshape(-1)]  # only windows with audio in them
        emb = self.embed_windows(windows)  # [V, E]
        full = emb.new_zeros(batch * n_windows, emb.shape[1])
        full[mask.reshape(-1)] = emb
        full = full.view(batch, n_windows, -1)
        weights = mask.to(emb.dtype)
        return (full * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)


def mel_fmax(cfg: AudioEncoderConfig) -> float:
    """The log-mel front end's fmax in Hz: `cfg.fmax`, or hear21passt's default for None (sr/2 - fmax_aug_range/2).
    Refuses a value that training's random shift (up to +fmax_aug_range/2) would push past the Nyquist frequency."""
    nyquist = SAMPLE_RATE_HZ // 2
    fmax = nyquist - cfg.fmax_aug_range // 2 if cfg.fmax is None else cfg.fmax
    if fmax + cfg.fmax_aug_range // 2 > nyquist:
        raise ValueError(
            f"model.audio.fmax={cfg.fmax} with model.audio.fmax_aug_range={cfg.fmax_aug_range}: the mel filters' top "
            f"edge would reach {fmax + cfg.fmax_aug_range // 2:g} Hz in training, past the Nyquist frequency {nyquist} "
            "Hz; lower fmax, or set it to null for hear21passt's default"
        )
    if not cfg.fmin + cfg.fmin_aug_range - 1 < fmax - cfg.fmax_aug_range // 2:
        raise ValueError(
            f"model.audio.fmin={cfg.fmin} (+ fmin_aug_range {cfg.fmin_aug_range}) and model.audio.fmax={fmax} "
            f"(- fmax_aug_range/2 {cfg.fmax_aug_range // 2}) overlap: the mel filters would have no band"
        )
    return fmax


def load_passt_weights(model: nn.Module, path: str) -> None:
    """Load a local PaSST state dict (AudioSet classifier heads ignored); every other key must match."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(
            f"model.audio.weights: no file {file}; download a PaSST checkpoint (e.g. passt-s-f128-p16-s16-ap.468.pt "
            "from github.com/kkoutini/PaSST/releases) to a local path, or set it to null for random initialisation"
        )
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    state = {k.removeprefix("net.").removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist."))}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"model.audio.weights: {file} does not fit the configured PaSST: {exc}") from None
    if missing or unexpected:
        raise ValueError(
            f"model.audio.weights: {file} does not fit the configured PaSST (embed_dim, depth, stride, input_tdim); "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
