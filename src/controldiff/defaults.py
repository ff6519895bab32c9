"""The reference pipelines' defaults, per model family and task: the one table.

Each row was read from the ``__call__`` signature of the diffusers pipeline named in
``REFERENCE`` (diffusers 0.42.1, ``pipelines/stable_diffusion/`` and
``stable_diffusion_xl/``); ``tests/test_defaults.py`` checks the table against those
signatures. An argument of :meth:`controldiff.Pipeline.__call__` left at ``None`` takes the
value of this table for the model and task, and ``out.settings`` records what was used.

Sizes are not in the table: ``height``/``width`` default to the input image's size
(rounded down to the latent factor), else to a control image's (ControlNet, adapter,
InstructPix2Pix), else to the model's (UNet sample size x latent factor). The reference
does the same except where ``DIFFERENCES`` says.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

TASKS = ("txt2img", "img2img", "inpaint", "instruct_pix2pix", "depth2img")


@dataclass(frozen=True)
class Defaults:
    """One row. ``strength``: None where the reference takes no image to noise (an ``image=``
    given anyway is noised with the family's img2img strength). InstructPix2Pix's
    ``image_guidance_scale`` is the control's own default (1.5, as the reference)."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    strength: Optional[float] = None
    eta: float = 0.0
    aesthetic_score: float = 6.0            # SDXL refiner time ids (5 of them); unused elsewhere
    negative_aesthetic_score: float = 2.5

    def as_dict(self) -> dict:
        return asdict(self)


_TABLE = {
    ("sd", "txt2img"): Defaults(),
    ("sd", "img2img"): Defaults(strength=0.8),
    ("sd", "inpaint"): Defaults(strength=1.0),
    ("sd", "instruct_pix2pix"): Defaults(num_inference_steps=100),
    ("sd", "depth2img"): Defaults(strength=0.8),
    ("sdxl", "txt2img"): Defaults(guidance_scale=5.0),
    ("sdxl", "img2img"): Defaults(guidance_scale=5.0, strength=0.3),
    ("sdxl", "inpaint"): Defaults(guidance_scale=7.5, strength=0.9999),
    ("sdxl", "instruct_pix2pix"): Defaults(num_inference_steps=100, guidance_scale=5.0),
    # no reference pipeline (there are no 5-channel SDXL depth models): SD's depth2img with SDXL's guidance
    ("sdxl", "depth2img"): Defaults(guidance_scale=5.0, strength=0.8),
}

#: The diffusers pipeline each row was read from.
REFERENCE = {
    ("sd", "txt2img"): "StableDiffusionPipeline",
    ("sd", "img2img"): "StableDiffusionImg2ImgPipeline",
    ("sd", "inpaint"): "StableDiffusionInpaintPipeline",
    ("sd", "instruct_pix2pix"): "StableDiffusionInstructPix2PixPipeline",
    ("sd", "depth2img"): "StableDiffusionDepth2ImgPipeline",
    ("sdxl", "txt2img"): "StableDiffusionXLPipeline",
    ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline",
    ("sdxl", "instruct_pix2pix"): "StableDiffusionXLInstructPix2PixPipeline",
}

#: Defaults where we knowingly differ from the reference (README, "Differences from the reference").
DIFFERENCES = {
    ("sd", "inpaint"): "height/width: the reference uses the model's size and resizes the image to it",
    ("sdxl", "inpaint"): "height/width: the reference uses the model's size and resizes the image to it",
    ("sdxl", "instruct_pix2pix"): "height/width: the reference uses the model's size and resizes the image to it",
}


def group(family: str) -> str:
    """SD1 and SD2 share the StableDiffusion* pipelines; SDXL has its own."""
    return "sdxl" if family == "sdxl" else "sd"


def task_of(kind: str, image, mask_image) -> str:
    """The task a call performs: the UNet kind first (8/5/9 channels), then the inputs."""
    if kind == "instruct_pix2pix":
        return "instruct_pix2pix"
    if kind == "depth":
        return "depth2img"
    if kind == "inpaint" or mask_image is not None:
        return "inpaint"
    return "img2img" if image is not None else "txt2img"


def defaults_for(family: str, task: str) -> Defaults:
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    return _TABLE[(group(family), task)]


def default_strength(family: str, task: str) -> float:
    """The strength an ``image=`` is noised with when none is given: the task's, else the
    family's img2img strength (an image given to an instruct-pix2pix model, say)."""
    row = defaults_for(family, task)
    return row.strength if row.strength is not None else defaults_for(family, "img2img").strength
