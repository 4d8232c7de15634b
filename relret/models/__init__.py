"""The dual encoder: `ModelConfig`, `build_model`, and the two encoders it combines."""

from relret.models.audio import AudioEncoderConfig, PaSSTEncoder
from relret.models.dual import DualEncoder, ModelConfig, ProjectionHead, build_model
from relret.models.text import TextEncoder, TextEncoderConfig, normalise_caption

__all__ = [
    "AudioEncoderConfig",
    "DualEncoder",
    "ModelConfig",
    "PaSSTEncoder",
    "ProjectionHead",
    "TextEncoder",
    "TextEncoderConfig",
    "build_model",
    "normalise_caption",
]
