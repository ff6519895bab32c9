"""Tiny random-weight model folders in diffusers layout, written with diffusers and
transformers themselves (test-only oracle code). Reused by every test that needs a model;
``conftest.py`` caches them per session (fixture ``tiny_model``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from controldiff import tiny

PIPELINE_CLASSES = {
    ("sd1", 4): "StableDiffusionPipeline",
    ("sd2", 4): "StableDiffusionPipeline",
    ("sdxl", 4): "StableDiffusionXLPipeline",
    ("sd1", 9): "StableDiffusionInpaintPipeline",
    ("sd2", 9): "StableDiffusionInpaintPipeline",
    ("sdxl", 9): "StableDiffusionXLInpaintPipeline",
    ("sd1", 8): "StableDiffusionInstructPix2PixPipeline",
    ("sd2", 8): "StableDiffusionInstructPix2PixPipeline",
    ("sdxl", 8): "StableDiffusionXLInstructPix2PixPipeline",
    ("sd2", 5): "StableDiffusionDepth2ImgPipeline",
    ("sd1", 5): "StableDiffusionDepth2ImgPipeline",
}


def perturb_norms(module: torch.nn.Module) -> torch.nn.Module:
    """Give every LayerNorm/GroupNorm a random affine transform (weight ~ N(1, 0.2), bias ~
    N(0.3, 0.2)), drawn from the global torch generator.

    Freshly initialised norms are the identity (weight 1, bias 0). A model built that way
    is degenerate: a bug that skips a norm's affine step passes every parity test, and the
    CLIP encoder's final LayerNorm outputs tokens of mean exactly 0, so A1111's
    mean-restoring prompt weighting divides 0 by 0. Real checkpoints have neither
    property; the bias mean is kept away from 0 on purpose.
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.3, 0.2)
    return module


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _text_encoder(folder: Path, cfg: dict, with_projection: bool) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = dict(cfg)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    cfg["architectures"] = [cls.__name__]
    model = perturb_norms(cls(CLIPTextConfig.from_dict(cfg)).eval())
    with torch.no_grad():  # the hidden states before the final norm (SDXL's penultimate ones) get a
        for name, p in model.named_parameters():  # mean away from 0 too, as in real CLIP models
            if name.endswith("position_embedding.weight"):
                p.add_(0.3)
    model.save_pretrained(folder)


def build_folder(
    tmp_path: str | Path,
    family: str = "sd1",
    in_channels: int = 4,
    latent_factor: int = 8,
    prediction_type: str = "epsilon",
    seed: int = 0,
    refiner: bool = False,
    variant: str | None = None,
) -> Path:
    """Write a tiny diffusers model folder under ``tmp_path`` and return it.

    ``family``: "sd1" (quick_gelu CLIP, PNDM), "sd2" (gelu CLIP, DDIM, pad token "!",
    ``prediction_type`` honoured), "sdxl" (two text encoders, Euler; ``refiner=True``: only
    text_encoder_2 and 5 aesthetic time ids). ``variant`` also saves the weights under that
    variant name (``*.fp16.safetensors``, float16).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if family not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"family must be sd1, sd2 or sdxl, not {family!r}")
    if refiner and family != "sdxl":
        raise ValueError("refiner=True needs family='sdxl'")
    root = Path(tmp_path)
    root.mkdir(parents=True, exist_ok=True)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet_cfg = tiny.unet_config(family, in_channels=in_channels)
        if refiner:
            # refiner: only the OpenCLIP-bigG-like encoder (hidden 32) and aesthetic-score time ids
            unet_cfg.update(cross_attention_dim=32, projection_class_embeddings_input_dim=8 * 5 + 32)
        unet = perturb_norms(UNet2DConditionModel(**unet_cfg).eval())
        vae = perturb_norms(AutoencoderKL(**tiny.vae_config(latent_factor=latent_factor)).eval())
        unet.save_pretrained(root / "unet")
        vae.save_pretrained(root / "vae")
        if variant:
            unet.half().save_pretrained(root / "unet", variant=variant)
            vae.half().save_pretrained(root / "vae", variant=variant)

        index: dict = {
            "_class_name": PIPELINE_CLASSES.get((family, in_channels), "StableDiffusionPipeline"),
            "_diffusers_version": "0.42.1",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        sched = tiny.scheduler_config(family, prediction_type)
        sched["prediction_type"] = prediction_type
        if family == "sdxl":
            if not refiner:
                _text_encoder(root / "text_encoder", tiny.text_encoder_config(), with_projection=False)
                tiny.write_tokenizer(root / "tokenizer")
                index["text_encoder"] = ["transformers", "CLIPTextModel"]
                index["tokenizer"] = ["transformers", "CLIPTokenizer"]
            else:
                index["_class_name"] = "StableDiffusionXLImg2ImgPipeline"
                index["text_encoder"] = [None, None]
                index["tokenizer"] = [None, None]
                index["requires_aesthetics_score"] = True
            _text_encoder(root / "text_encoder_2", tiny.text_encoder_config(act="gelu"), with_projection=True)
            tiny.write_tokenizer(root / "tokenizer_2", pad_token="!")
            index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
            index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
            index["force_zeros_for_empty_prompt"] = True
        else:
            act = "gelu" if family == "sd2" else "quick_gelu"
            _text_encoder(root / "text_encoder", tiny.text_encoder_config(act=act), with_projection=False)
            tiny.write_tokenizer(root / "tokenizer", pad_token="!" if family == "sd2" else "<|endoftext|>")
            index["text_encoder"] = ["transformers", "CLIPTextModel"]
            index["tokenizer"] = ["transformers", "CLIPTokenizer"]
            index["safety_checker"] = [None, None]
            index["feature_extractor"] = [None, None]
            index["requires_safety_checker"] = False
            if in_channels == 5:
                index["depth_estimator"] = [None, None]
        if variant:
            for slot in ("text_encoder", "text_encoder_2"):
                if (root / slot).is_dir():
                    from safetensors.torch import load_file, save_file

                    sd = load_file(str(root / slot / "model.safetensors"))
                    save_file({k: v.half() for k, v in sd.items()}, str(root / slot / f"model.{variant}.safetensors"),
                              metadata={"format": "pt"})
        index["scheduler"] = ["diffusers", sched["_class_name"]]
        _write_json(root / "scheduler" / "scheduler_config.json", sched)
        _write_json(root / "model_index.json", index)
    return root


def build_controlnet(model: Path, out: Path, seed: int = 1, std: float = 0.05) -> Path:
    """A diffusers ControlNet shaped after the tiny model's UNet, saved in ``out``, every weight
    drawn N(0, std) (diffusers zero-initialises the output convs: a no-op control)."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(Path(model) / "unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16),
                                                 load_weights_from_unet=False)
        for p in cn.parameters():
            torch.nn.init.normal_(p, std=std)
    cn.save_pretrained(out)
    return Path(out)
