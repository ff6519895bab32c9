"""The KL autoencoder (SD's VAE) with diffusers' parameter names.

``encode(x)`` gives a :class:`DiagonalGaussian` over latents, ``decode(z)`` an image in
[-1, 1] (unscaled latents: the pipeline applies ``scaling_factor``/``shift_factor``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..noise import Generator, randn_tensor
from .attention import Attention
from .blocks import Downsample2D, ResnetBlock2D, Upsample2D
from .config import Config
from .module import Model

# diffusers' AutoencoderKL.__init__ defaults (0.42), tuples as JSON lists.
DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
_EPS = 1e-6


class DiagonalGaussian:
    """The encoder's posterior; ``sample`` draws like diffusers' DiagonalGaussianDistribution."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Generator = None) -> torch.Tensor:
        noise = randn_tensor(self.mean.shape, generator=generator, device=self.parameters.device,
                             dtype=self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class _MidBlock(nn.Module):
    """resnet, single-head spatial self-attention (optional), resnet."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        attn = (
            Attention(channels, heads=1, dim_head=channels, bias=True, upcast_softmax=True, norm_num_groups=groups,
                      eps=_EPS, residual_connection=True)
            if add_attention
            else None
        )
        self.attentions = nn.ModuleList([attn])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, _EPS) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class _DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, _EPS)
             for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class _UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, _EPS)
             for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        ch, groups = list(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            [_DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, i < len(ch) - 1)
             for i in range(len(ch))]
        )
        self.mid_block = _MidBlock(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        rev, groups = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], kernel_size=3, padding=1)
        self.mid_block = _MidBlock(rev[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [_UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, groups, i < len(rev) - 1)
             for i in range(len(rev))]
        )
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def _check(cfg: Config) -> None:
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        for name in cfg[key]:
            if name != allowed:
                raise ValueError(f"vae config: {key} entry {name!r} is not supported (only {allowed!r})")
    if cfg.act_fn not in ("silu", "swish"):
        raise ValueError(f"vae config: act_fn={cfg.act_fn!r} is not supported (only 'silu')")
    n = len(cfg.block_out_channels)
    if len(cfg.down_block_types) != n or len(cfg.up_block_types) != n:
        raise ValueError("vae config: down_block_types, up_block_types and block_out_channels must have the same length")


class AutoencoderKL(Model):
    """SD's VAE. ``sliced=True`` in encode/decode runs one sample at a time (less peak memory)."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.config = cfg = Config.with_defaults(DEFAULTS, config)
        _check(cfg)
        c = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None

    @property
    def latent_factor(self) -> int:
        """Pixels per latent along each side: ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.config.block_out_channels) - 1)


    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(self, x: torch.Tensor, *, sliced: bool = False) -> DiagonalGaussian:
        """Images ``(B, C, H, W)`` in [-1, 1] -> posterior over (unscaled) latents."""
        if sliced and x.shape[0] > 1:
            return DiagonalGaussian(torch.cat([self._encode(part) for part in x.split(1)]))
        return DiagonalGaussian(self._encode(x))

    def decode(self, z: torch.Tensor, *, sliced: bool = False) -> torch.Tensor:
        """(Unscaled) latents -> images in about [-1, 1]."""
        if sliced and z.shape[0] > 1:
            return torch.cat([self._decode(part) for part in z.split(1)])
        return self._decode(z)
