"""Textual inversion embeddings: Pipeline methods."""


class TextualInversionMixin:
    """Mixed into :class:`controldiff.Pipeline`."""
