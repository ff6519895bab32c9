"""Validation images: every ``validation_every`` steps and at the end, ``validation_images``
images of ``validation_prompt`` from the model being trained, as it is now (the same modules,
the adapters active, nothing reloaded), image ``k`` from seed ``seed + k`` at every step, so
that the steps compare (with EMA the end's images are the average's, as saved). Written to ``OUTPUT/validation/step-STEP-K.png`` with the settings
that made them (A1111 ``parameters``) through a temporary file renamed when complete.

Generation must not change training: the modules get their train/eval modes back and the
global RNG states (Python, numpy, torch) are as before, so a run with validation images
trains exactly as one without."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..checks import positive_int
from ..text.encode import check_text
from . import checkpoint as ckpt

__all__ = ["check_validation", "validation_images", "write_image"]


def check_validation(prompt: Optional[str], every: Optional[int], images: int) -> None:
    """The validation arguments: a prompt and how often, together or not at all."""
    if (prompt is None) != (every is None):
        given, missing = ("validation_prompt", "validation_every") if every is None else \
            ("validation_every", "validation_prompt")
        raise ValueError(f"{missing}: validation images need both validation_prompt and validation_every; "
                         f"got {given} only")
    positive_int(images, "validation_images")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ValueError(f"validation_prompt: expected text, got {prompt!r}")
        check_text(prompt, "validation_prompt")
        positive_int(every, "validation_every")


def write_image(path: Path, image, parameters: str) -> Path:
    """A PNG with A1111 ``parameters`` at ``path``, through a temporary file renamed when complete."""
    from ..png import write_png

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write_png(image, f, parameters)

    return ckpt.atomic_path(path, write)


def validation_images(components, prompt: str, count: int, resolution: int, seed: Optional[int], step: int,
                      output: Path, model_name: str) -> list[Path]:
    """Generate ``count`` images with ``components`` (:class:`~controldiff.loading.folder.Components`,
    trained in place); return the files."""
    from .. import Pipeline
    from ..png import format_parameters
    from .prior import GENERATION_BATCH

    c = components
    pipe = Pipeline(c.unet, c.vae, c.text_encoders, c.tokenizers, c.scheduler_config, c.info)
    pipe.progress = False
    folder = Path(output) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    base = 0 if seed is None else seed
    modules = [m for root in (c.unet, c.vae, *c.text_encoders) if root is not None for m in root.modules()]
    modes = [m.training for m in modules]
    rng = ckpt.rng_state()
    written = []
    try:
        for m in modules:
            m.training = False
        for start in range(0, count, GENERATION_BATCH):
            ks = list(range(start, min(count, start + GENERATION_BATCH)))
            out = pipe([prompt] * len(ks), height=resolution, width=resolution,
                       generator=[torch.Generator().manual_seed(base + k) for k in ks])
            s = out.settings
            for k, image in zip(ks, out.images):
                text = format_parameters(prompt, None, s["steps"], s["scheduler"], s["guidance_scale"], base + k,
                                         image.width, image.height, model_name)
                written.append(write_image(folder / f"step-{step}-{k}.png", image, text))
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode
        ckpt.set_rng_state(rng)
    return written
