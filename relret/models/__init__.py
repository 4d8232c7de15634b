"""The dual encoder: `build_model` and the two encoders it combines (their configs live in relret.config)."""

from relret.models.audio import PaSSTEncoder
from relret.models.dual import DualEncoder, ProjectionHead, build_model
from relret.models.text import TextEncoder, normalise_caption

__all__ = ["DualEncoder", "PaSSTEncoder", "ProjectionHead", "TextEncoder", "build_model", "normalise_caption"]
