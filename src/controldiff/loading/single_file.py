"""Single-file checkpoints (original SD layouts): Pipeline constructors."""


class SingleFileMixin:
    """Mixed into :class:`controldiff.Pipeline`."""
