"""T2I-Adapter with diffusers' parameter names: a small conv net turning a control image
into one feature map per UNet down block (``down_intrablock_additional_residuals``).

Adapter types as in diffusers' ``T2IAdapter`` config: ``full_adapter`` (SD 1.x/2.x),
``full_adapter_xl`` (SDXL) and ``light_adapter``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .config import Config
from .module import Model

# diffusers' T2IAdapter.__init__ defaults (0.42).
DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "channels": [320, 640, 1280, 1280],
    "num_res_blocks": 2,
    "downscale_factor": 8,
    "adapter_type": "full_adapter",
}
ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


class AdapterResnetBlock(nn.Module):
    def __init__(self, channels: int, kernel_2: int = 1):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, kernel_size=kernel_2, padding=kernel_2 // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.act(self.block1(x))) + x


class AdapterBlock(nn.Module):
    """Optional 2x average-pool, optional 1x1 channel change, then resnets."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, down: bool = False):
        super().__init__()
        self.downsample = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True) if down else None
        self.in_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        self.resnets = nn.Sequential(*[AdapterResnetBlock(out_channels) for _ in range(num_res_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class LightAdapterBlock(nn.Module):
    """Like :class:`AdapterBlock` but through a 4x narrower bottleneck."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, down: bool = False):
        super().__init__()
        mid = out_channels // 4
        self.downsample = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True) if down else None
        self.in_conv = nn.Conv2d(in_channels, mid, kernel_size=1)
        self.resnets = nn.Sequential(*[AdapterResnetBlock(mid, kernel_2=3) for _ in range(num_res_blocks)])
        self.out_conv = nn.Conv2d(mid, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.out_conv(self.resnets(self.in_conv(x)))


class _Body(nn.Module):
    """Pixel-unshuffle, optional ``conv_in``, then the blocks; every block's output is a feature."""

    def __init__(self, cfg: Config):
        super().__init__()
        ch, n_res, f = list(cfg.channels), cfg.num_res_blocks, cfg.downscale_factor
        in_ch = cfg.in_channels * f**2
        self.unshuffle = nn.PixelUnshuffle(f)
        if cfg.adapter_type == "light_adapter":
            self.conv_in = None
            blocks = [LightAdapterBlock(in_ch, ch[0], n_res)]
            blocks += [LightAdapterBlock(ch[i], ch[i + 1], n_res, down=True) for i in range(len(ch) - 1)]
            blocks.append(LightAdapterBlock(ch[-1], ch[-1], n_res, down=True))
            self.total_downscale_factor = f * 2 ** len(ch)
        elif cfg.adapter_type == "full_adapter_xl":
            self.conv_in = nn.Conv2d(in_ch, ch[0], kernel_size=3, padding=1)
            blocks = []
            for i in range(len(ch)):
                if i == 1:
                    blocks.append(AdapterBlock(ch[0], ch[1], n_res))
                elif i == 2:
                    blocks.append(AdapterBlock(ch[1], ch[2], n_res, down=True))
                else:
                    blocks.append(AdapterBlock(ch[i], ch[i], n_res))
            self.total_downscale_factor = f * 2
        else:
            self.conv_in = nn.Conv2d(in_ch, ch[0], kernel_size=3, padding=1)
            blocks = [AdapterBlock(ch[0], ch[0], n_res)]
            blocks += [AdapterBlock(ch[i - 1], ch[i], n_res, down=True) for i in range(1, len(ch))]
            self.total_downscale_factor = f * 2 ** (len(ch) - 1)
        self.body = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.unshuffle(x)
        if self.conv_in is not None:
            x = self.conv_in(x)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class T2IAdapter(Model):
    """``adapter(image in [0, 1]) -> [feature per UNet down block]`` (diffusers' ``T2IAdapter``)."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.config = cfg = Config.with_defaults(DEFAULTS, config)
        if cfg.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"t2i adapter config: adapter_type={cfg.adapter_type!r} is not supported "
                             f"(expected one of {ADAPTER_TYPES})")
        if not cfg.channels:
            raise ValueError("t2i adapter config: channels must not be empty")
        self.adapter = _Body(cfg)

    @property
    def downscale_factor(self) -> int:
        """Pixels per position of the first feature (the pixel-unshuffle factor)."""
        return self.config.downscale_factor

    @property
    def total_downscale_factor(self) -> int:
        return self.adapter.total_downscale_factor


    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.adapter(x)
