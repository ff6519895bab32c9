"""The embedded default model: a small random-weight SD1-style folder.

So that ``controldiff generate -p "..."`` works out of the box with no download,
the CLI falls back to this model. Until the project ships trained weights it is
built locally, once, from a fixed seed with our own model classes, and saved in
the ordinary diffusers layout (so it exercises the same loading path as a real
model). Its images are noise: it demonstrates the plumbing, not the art.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .. import tiny

NAME = "demo-sd1-v1"  # bump the version whenever the build below changes
SEED = 20240229
DEFAULT_SIZE = 256

DEMO_NOTICE = (
    "Note: using the built-in demo model, which has random weights; "
    "its images are noise, not pictures. Pass a model folder to generate real images."
)


def cache_dir() -> Path:
    """``$CONTROLDIFF_HOME`` if set, else ``~/.cache/controldiff``."""
    home = os.environ.get("CONTROLDIFF_HOME")
    return Path(home) if home else Path.home() / ".cache" / "controldiff"


def default_model_path() -> Path:
    """The demo model folder, built on first use (a second or two)."""
    target = cache_dir() / NAME
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a crash leaves a stray temp dir, never a half model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is not secret
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (the target now exists and is not empty).
            if not (target / "model_index.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def unet_config() -> dict:
    cfg = tiny.unet_config("sd1", sample_size=DEFAULT_SIZE // 8, cross_attention_dim=64)
    cfg.update(
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        block_out_channels=[32, 64, 64],
        layers_per_block=1,
        norm_num_groups=16,
    )
    return cfg


def vae_config() -> dict:
    return tiny.vae_config(latent_factor=8, sample_size=DEFAULT_SIZE)


def text_encoder_config() -> dict:
    return tiny.text_encoder_config(hidden_size=64, layers=4, projection_dim=64)


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded weights that do not depend on how the class initialises itself.

    Matrices/kernels ~ N(0, 1/fan_in) (keeps activations in range), 1-D weights
    (norms) = 1, biases = 0. Parameters are visited in name order.
    """
    if any(p.is_meta for p in module.parameters()):
        module.to_empty(device="cpu")
    state = {}
    params = dict(module.named_parameters())
    for name in sorted(params):
        p = params[name]
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            t = torch.randn(p.shape, generator=generator) / math.sqrt(fan_in)
        elif name.endswith("weight"):
            t = torch.ones(p.shape)
        else:
            t = torch.zeros(p.shape)
        state[name] = t
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t)
    return {k: v.contiguous() for k, v in module.state_dict().items()}


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


def write_index(folder: Path) -> None:
    """The scheduler config and ``model_index.json``, last: its presence marks a complete folder."""
    (folder / "scheduler").mkdir()
    sched = {**tiny.scheduler_config("sd1"), "_diffusers_version": "0.42.1"}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def build(folder: str | Path) -> Path:
    """Write the demo model (diffusers layout, safetensors) into an empty ``folder``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.unet import UNet2DConditionModel
    from ..models.vae import AutoencoderKL

    folder = Path(folder)
    g = torch.Generator().manual_seed(SEED)

    unet = UNet2DConditionModel(unet_config())
    write_component(folder / "unet", unet_config(), _randomize(unet, g), "UNet2DConditionModel")
    del unet
    vae = AutoencoderKL(vae_config())
    write_component(folder / "vae", vae_config(), _randomize(vae, g), "AutoencoderKL")
    del vae

    te_cfg = text_encoder_config()
    te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in te_cfg.items() if k not in ("architectures", "model_type")}))
    write_component(folder / "text_encoder", None, _randomize(te, g), "CLIPTextModel", te.config)
    tiny.write_tokenizer(folder / "tokenizer")
    write_index(folder)
    return folder
