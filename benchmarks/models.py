"""Random-weight models for benchmarks: tiny, SD1.5 and SDXL architectures.

Built with diffusers' classes (the reference) from a fixed seed; ours gets the same
tensors (shared storage, no copy) through load_state_dict(assign=True).
"""
from __future__ import annotations

import tempfile

import torch

from controldiff import tiny

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
    block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20], use_linear_projection=True,
    transformer_layers_per_block=[1, 2, 10],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215,
)
# SD1.5's layout with narrower channels: for CPU runs of the control benchmarks.
SD15_SMALL_UNET = dict(SD15_UNET, block_out_channels=[64, 128, 256, 256])
SMALL_VAE = dict(SD_VAE, block_out_channels=[32, 64, 128, 128])
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              projection_dim=1280, hidden_act="gelu")


def _text_cfg(over: dict) -> dict:
    cfg = tiny.text_encoder_config()
    cfg.update(over)
    cfg["vocab_size"] = 49408
    return cfg


def configs(model: str):
    """(family, unet, vae, [text encoder configs], scheduler config)."""
    if model == "tiny":
        return "sd1", tiny.unet_config("sd1"), tiny.vae_config(8), [tiny.text_encoder_config()], tiny.scheduler_config("sd1")
    if model == "tiny-sdxl":
        return ("sdxl", tiny.unet_config("sdxl"), tiny.vae_config(8), [tiny.text_encoder_config(), tiny.text_encoder_config()],
                tiny.scheduler_config("sdxl"))
    if model == "sd15":
        return "sd1", SD15_UNET, SD_VAE, [_text_cfg(CLIP_L)], tiny.scheduler_config("sd1")
    if model == "sd15-small":
        return "sd1", SD15_SMALL_UNET, SMALL_VAE, [_text_cfg(CLIP_L)], tiny.scheduler_config("sd1")
    if model == "sdxl":
        vae = dict(SD_VAE, scaling_factor=0.13025, force_upcast=True, sample_size=1024)
        return "sdxl", SDXL_UNET, vae, [_text_cfg(CLIP_L), _text_cfg(CLIP_G)], tiny.scheduler_config("sdxl")
    raise ValueError(f"model: expected tiny, tiny-sdxl, sd15, sd15-small or sdxl, got {model!r}")


def build(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32, need_ours: bool = True):
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import controldiff as cd
    from controldiff.loading.family import detect_family
    from controldiff.models.unet import UNet2DConditionModel
    from controldiff.models.vae import AutoencoderKL

    family, unet_cfg, vae_cfg, text_cfgs, sched_cfg = configs(model)
    torch.manual_seed(0)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**unet_cfg).to(dtype).eval()
        vae = diffusers.AutoencoderKL(**vae_cfg).to(dtype).eval()
        encoders = []
        for i, tc in enumerate(text_cfgs):
            cls = CLIPTextModelWithProjection if (family == "sdxl" and i == len(text_cfgs) - 1) else CLIPTextModel
            encoders.append(cls(CLIPTextConfig.from_dict(tc)).to(dtype).eval())
    tok_dir = tempfile.mkdtemp()
    tiny.write_tokenizer(tok_dir)
    tokenizers = [CLIPTokenizer.from_pretrained(tok_dir) for _ in encoders]
    sched_cls = getattr(diffusers, sched_cfg["_class_name"])
    scheduler = sched_cls.from_config(sched_cfg)
    if family == "sdxl":
        ref = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                                  tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                                  scheduler=scheduler)
    else:
        ref = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet,
                                                scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False)
    ours = None
    if need_ours:
        with torch.device("meta"):
            our_unet = UNet2DConditionModel(dict(unet.config))
            our_vae = AutoencoderKL(dict(vae.config))
        our_unet.load_state_dict(unet.state_dict(), assign=True)
        our_vae.load_state_dict(vae.state_dict(), assign=True)
        our_unet.eval().requires_grad_(False)
        our_vae.eval().requires_grad_(False)
        info = detect_family(dict(unet.config), [e.config.to_dict() for e in encoders], sched_cfg, dict(vae.config))
        ours = cd.Pipeline(our_unet, our_vae, encoders, tokenizers, sched_cfg, info)
    return ref, ours
