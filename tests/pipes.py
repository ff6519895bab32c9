"""Our pipeline and the reference (diffusers) pipeline on the same tiny model folder, built
the way every parity test needs them: no progress bars, no safety checker."""
from __future__ import annotations

import controldiff as cd


def ours(path) -> cd.Pipeline:
    pipe = cd.Pipeline.from_pretrained(path)
    pipe.progress = False
    return pipe


def reference(cls_name: str, path, **kw):
    """The diffusers pipeline class ``cls_name`` loaded from ``path``."""
    import diffusers

    if "XL" not in cls_name:
        kw = {"safety_checker": None, "requires_safety_checker": False, **kw}
    pipe = getattr(diffusers, cls_name).from_pretrained(path, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe
