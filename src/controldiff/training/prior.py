"""Prior preservation (Ruiz et al. 2022, DreamBooth): train on the subject's images and, in
the same batch, on images of its class made by the model before training, so that the class
word keeps its meaning. Shared by every method (DreamBooth and LoRA alike), as diffusers'
``train_dreambooth.py`` and ``train_dreambooth_lora.py`` share it.

As those scripts: the data set is ``max(instances, class images)`` long, example ``i`` pairs
instance ``i % n`` with class image ``i % m`` (each transformed in that order, so random
crops draw as theirs), the batch is the instances then their class images (one VAE pass,
one UNet pass), and the loss is ``instance loss + prior_loss_weight * prior loss`` (the
prior part plain MSE, min-SNR weighting on the instance part only).

Missing class images are made by our own :class:`controldiff.Pipeline` on the same model
(its default steps, guidance and scheduler, at the training resolution), image ``k`` from
seed ``seed + k`` (``seed`` 0 without one), written as PNGs with the settings that made them
(A1111 ``parameters``), each through a temporary file renamed when complete. Images already
in the folder are reused: an interrupted run continues where it stopped.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from ..checks import finite_number, positive_int
from ..text.encode import check_text
from .data import IMAGE_SUFFIXES, Example, read_folder
from .objective import Objective

__all__ = ["check_prior", "class_images", "class_examples", "Pairs", "PriorObjective", "GENERATION_BATCH"]

GENERATION_BATCH = 4  # images per pipeline call (the scripts' --sample_batch_size)


def check_prior(class_data, class_prompt, num_class_images, prior_loss_weight) -> None:
    """The prior-preservation arguments, together or not at all."""
    if (class_data is None) != (class_prompt is None):
        given, missing = ("class_data", "class_prompt") if class_prompt is None else ("class_prompt", "class_data")
        raise ValueError(f"{missing}: prior preservation needs both class_data and class_prompt; got {given} only")
    positive_int(num_class_images, "num_class_images")
    finite_number(prior_loss_weight, "prior_loss_weight", minimum=0)
    if class_prompt is not None:
        check_text(class_prompt, "class_prompt")
    if class_data is not None and Path(class_data).exists() and not Path(class_data).is_dir():
        raise ValueError(f"class_data: {class_data} exists and is not a folder")


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def class_images(model, folder, prompt: str, count: int, resolution: int, seed: Optional[int] = None, *,
                 device="cpu", dtype=torch.float32, progress: bool = True) -> list[Path]:
    """Make the class images ``folder`` lacks to hold ``count``; return the new files."""
    from tqdm.auto import tqdm

    from .. import Pipeline
    from ..png import format_parameters
    from .validation import write_image

    folder = Path(folder)
    have = len(_images_in(folder))
    if have >= count:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype)
    pipe.progress = False
    base = 0 if seed is None else seed
    written = []
    with tqdm(total=count - have, desc="class images", disable=not progress) as bar:
        for start in range(have, count, GENERATION_BATCH):
            seeds = [base + k for k in range(start, min(count, start + GENERATION_BATCH))]
            out = pipe([prompt] * len(seeds), height=resolution, width=resolution,
                       generator=[torch.Generator().manual_seed(s) for s in seeds])
            s = out.settings
            for k, (image, s_k) in enumerate(zip(out.images, seeds), start):
                text = format_parameters(prompt, None, s["steps"], s["scheduler"], s["guidance_scale"], s_k,
                                         image.width, image.height, Path(model).name)
                written.append(write_image(folder / f"class-{k:05d}-{s_k}.png", image, text))
                bar.update(1)
    return written


def class_examples(folder, prompt: str, count: int, resolution: int) -> list[Example]:
    """The first ``count`` class images of ``folder`` (by name), each captioned ``prompt``."""
    return [replace(e, caption=prompt) for e in read_folder(folder, resolution, prompt)[:count]]


@dataclass(frozen=True)
class Pairs:
    """Data set index -> examples, with ``examples = instances + class images``."""

    instances: int
    classes: int

    @property
    def count(self) -> int:
        return max(self.instances, self.classes)

    def __call__(self, indices) -> tuple[list[int], list[int]]:
        """(examples in the order their transforms draw: instance, class, instance, class ...;
        the batch order: the instances, then their class images, as positions in the first)."""
        drawn = []
        for i in indices:
            drawn += [i % self.instances, self.instances + i % self.classes]
        return drawn, list(range(0, len(drawn), 2)) + list(range(1, len(drawn), 2))


@dataclass
class PriorObjective(Objective):
    """The batch's first half is the instances, the second their class images; a loss mask
    (Custom Diffusion's) applies to the instances' loss only, as its script."""

    prior_loss_weight: float = 1.0

    def loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, *mask) -> torch.Tensor:
        pred, pred_prior = torch.chunk(pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        prior = torch.nn.functional.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
        instance = super().loss(pred, target, torch.chunk(timesteps, 2)[0], *[torch.chunk(m, 2)[0] for m in mask])
        return instance + self.prior_loss_weight * prior
