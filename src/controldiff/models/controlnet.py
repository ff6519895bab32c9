"""ControlNet (SD 1.x / 2.x / XL) with diffusers' parameter names.

A trainable copy of the UNet's encoder that also sees a control image; its 1x1 "zero
convs" turn every skip and the mid output into residuals for the UNet
(``down_block_additional_residuals``, ``mid_block_additional_residual``). Built from a
diffusers ``ControlNetModel`` ``config.json`` dict; the blocks and embeddings are the
UNet's own, so the two compute the encoder the same way.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, check_options
from .embeddings import TimestepEmbedding, Timesteps
from .unet import UNet2DConditionModel
from .unet_blocks import DOWN_BLOCKS, UNetMidBlock2DCrossAttn
from .module import Model

# diffusers' ControlNetModel.__init__ defaults (0.42), tuples as JSON lists.
DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "conditioning_channels": 3,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "projection_class_embeddings_input_dim": None,
    "controlnet_conditioning_channel_order": "rgb",
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "global_pool_conditions": False,
    "addition_embed_type_num_heads": 64,
}

_UNSUPPORTED = ("encoder_hid_dim", "encoder_hid_dim_type", "class_embed_type", "num_class_embeds",
                "resnet_time_scale_shift")
_ALLOWED = {
    "addition_embed_type": (None, "text_time"),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None),
    "act_fn": ("silu", "swish"),
    "controlnet_conditioning_channel_order": ("rgb", "bgr"),
}


def _check(cfg: Config) -> None:
    check_options(cfg, "controlnet", DEFAULTS, _UNSUPPORTED, _ALLOWED)
    for name in cfg.down_block_types:
        if name not in DOWN_BLOCKS:
            raise ValueError(f"controlnet config: down_block_types entry {name!r} is not supported "
                             f"(expected one of {list(DOWN_BLOCKS)})")
    if len(cfg.block_out_channels) != len(cfg.down_block_types):
        raise ValueError("controlnet config: block_out_channels and down_block_types must have the same length "
                         f"(got {len(cfg.block_out_channels)} and {len(cfg.down_block_types)})")
    if cfg.addition_embed_type == "text_time":
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if cfg[key] is None:
                raise ValueError(f"controlnet config: addition_embed_type='text_time' needs {key}")
    if not cfg.conditioning_embedding_out_channels:
        raise ValueError("controlnet config: conditioning_embedding_out_channels must not be empty")


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


class ControlNetConditioningEmbedding(nn.Module):
    """Control image (pixels) -> latent-resolution features added to ``conv_in``'s output."""

    def __init__(self, embedding_channels: int, conditioning_channels: int, block_out_channels):
        super().__init__()
        ch = list(block_out_channels)
        self.conv_in = nn.Conv2d(conditioning_channels, ch[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(ch[-1], embedding_channels, kernel_size=3, padding=1)

    @property
    def downscale(self) -> int:
        """Pixels per output position (must equal the VAE's latent factor)."""
        return 2 ** (len(self.blocks) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ControlNetModel(Model):
    """``controlnet(sample, t, embeds, image, scale) -> (down residuals, mid residual)``."""

    # The UNet's own embedding code: same attribute names (time_proj, time_embedding,
    # add_time_proj, add_embedding), so the two compute temb identically.
    time_embed = UNet2DConditionModel.time_embed
    added_embed = UNet2DConditionModel.added_embed

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.config = cfg = Config.with_defaults(DEFAULTS, config)
        _check(cfg)
        channels = list(cfg.block_out_channels)
        n = len(channels)
        heads = _per_block(cfg.num_attention_heads or cfg.attention_head_dim, n)
        layers = cfg.layers_per_block
        depth = _per_block(cfg.transformer_layers_per_block, n)
        temb_dim = channels[0] * 4
        attn = dict(use_linear_projection=cfg.use_linear_projection, upcast_attention=cfg.upcast_attention)

        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim)
        if cfg.addition_embed_type == "text_time":
            self.add_time_proj = Timesteps(cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_dim)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            channels[0], cfg.conditioning_channels, cfg.conditioning_embedding_out_channels)

        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(channels[0], channels[0], kernel_size=1)])
        out_ch = channels[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            last = i == n - 1
            self.down_blocks.append(DOWN_BLOCKS[kind](
                in_ch, out_ch, temb_channels=temb_dim, num_layers=layers, groups=cfg.norm_num_groups,
                eps=cfg.norm_eps, add_downsample=not last, downsample_padding=cfg.downsample_padding,
                heads=heads[i], cross_attention_dim=cfg.cross_attention_dim, transformer_layers=depth[i], **attn,
            ))
            for _ in range(layers + (0 if last else 1)):
                self.controlnet_down_blocks.append(nn.Conv2d(out_ch, out_ch, kernel_size=1))

        self.controlnet_mid_block = nn.Conv2d(channels[-1], channels[-1], kernel_size=1)
        self.mid_block = None
        if cfg.mid_block_type is not None:
            # "UNetMidBlock2D" (no attention) is the cross-attention block with zero transformer layers
            self.mid_block = UNetMidBlock2DCrossAttn(
                channels[-1], temb_dim, cfg.norm_num_groups, cfg.norm_eps, heads[-1], cfg.cross_attention_dim,
                transformer_layers=depth[-1], output_scale_factor=cfg.mid_block_scale_factor,
                num_layers=1 if cfg.mid_block_type == "UNetMidBlock2DCrossAttn" else 0, **attn,
            )


    @property
    def downscale(self) -> int:
        """Pixels of control image per latent position."""
        return self.controlnet_cond_embedding.downscale

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        *,
        added_cond_kwargs: Optional[Mapping[str, torch.Tensor]] = None,
        guess_mode: bool = False,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residuals scaled by ``conditioning_scale``; in guess mode (or for global-pool
        models) scaled from 0.1 (first skip) to 1.0 (mid) on a log scale, as in diffusers."""
        cfg = self.config
        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        context = encoder_hidden_states
        emb = self.time_embed(sample, timestep)
        if cfg.addition_embed_type == "text_time":
            emb = emb + self.added_embed(emb, added_cond_kwargs)

        sample = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        skips = [sample]
        for block in self.down_blocks:
            sample, block_skips = block(sample, emb, context)
            skips.extend(block_skips)
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb, context)

        down = [conv(s) for s, conv in zip(skips, self.controlnet_down_blocks)]
        mid = self.controlnet_mid_block(sample)
        if guess_mode and not cfg.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if cfg.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid
