"""LoRA loading (kohya and peft/diffusers formats): Pipeline methods."""


class LoraMixin:
    """Mixed into :class:`controldiff.Pipeline`."""
