"""The embedded default model: a 64x64 SD1-style text-to-image model of synthetic scenes.

So that ``controldiff generate -p "..."`` makes a real picture with no download, the package
ships a small model the project trained itself from scratch (``demo/recipe.py``, on the scenes
of ``demo/scenes.py``): coloured circles, squares and triangles at five positions, in two
sizes, up to three of them, on a plain background, described by captions such as
``EXAMPLE_PROMPT``. Because what it should draw is known exactly, every control is measured
on it with a pixel judge (``demo/judge.py``, ``demo/measure.py``).
"""
from __future__ import annotations

import json
from pathlib import Path


MODEL_DIR = Path(__file__).resolve().parent / "model"
NAME = "controldiff-scenes-64"
EXAMPLE_PROMPT = "a large red circle at the top left and a small yellow square at the bottom right on a blue background"
DEMO_NOTICE = (
    "Note: using the built-in demo model (64x64 scenes of coloured shapes, prompts like "
    f"\"{EXAMPLE_PROMPT}\"). Pass a model folder to generate other pictures."
)


def default_model_path() -> Path:
    """The shipped model folder (diffusers layout, float16 safetensors)."""
    if not (MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the built-in demo model is missing from {MODEL_DIR}: reinstall controldiff, "
                                "or make it with: python -m controldiff.demo.recipe OUT && "
                                "python -m controldiff.demo.recipe OUT --ship")
    return MODEL_DIR


def write_component(folder: Path, config: dict | None, state: dict, class_name: str, hf_config=None) -> None:
    """One component folder: ours (``config`` + diffusers' file names) or a transformers
    model's (``hf_config``: its ``config.json``, ``model.safetensors``)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if hf_config is not None:
        hf_config.to_json_file(folder / "config.json")
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return
    cfg = {"_class_name": class_name, "_diffusers_version": "0.42.1", **config}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(state, folder / "diffusion_pytorch_model.safetensors")


def write_index(folder: Path, scheduler: dict) -> None:
    """The scheduler config and ``model_index.json``, last: its presence marks a complete folder."""
    (folder / "scheduler").mkdir()
    sched = {**scheduler, "_diffusers_version": "0.42.1"}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler["_class_name"]],  # diffusers loads this class, not the config's
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
