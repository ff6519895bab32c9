"""The UNet's down, mid and up blocks (diffusers' block types and parameter names).

Down blocks return ``(hidden, skips)``; up blocks consume skips from the end. The optional
``extra`` argument of the down blocks is the T2I-Adapter ("intrablock") residual, added
where diffusers adds it: inside a cross-attention block after its last transformer, after
a plain block (and then the block's last skip carries it too, as in diffusers).

``stop`` / ``start`` run only some layers (DeepCache's shallow pass): a down block's first
``stop`` layers (no downsampler, no ``extra``); an up block's layers ``start:stop`` (its
upsampler only when it runs to the end), given the skips of those layers.
"""
from __future__ import annotations

from itertools import islice
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils import checkpoint

from .blocks import Downsample2D, ResnetBlock2D, Upsample2D
from .transformer import Transformer2DModel


def _layers(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


class _Block(nn.Module):
    """A block whose layers are recomputed in the backward pass, not kept, while training with
    ``gradient_checkpointing`` (set by ``UNet2DConditionModel.gradient_checkpointing``): less
    memory for one more forward. Inference and eval mode run the layers as they are."""

    gradient_checkpointing = False

    def _call(self, layer: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint.checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)


class DownBlock2D(_Block):
    has_cross_attention = False

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, groups, eps, add_downsample,
                 downsample_padding=1, dropout=0.0, **_):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps,
                           dropout=dropout) for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, downsample_padding)]) if add_downsample else None

    def forward(self, x, temb, context=None, extra: Optional[torch.Tensor] = None, stop: Optional[int] = None):
        skips = []
        for resnet in islice(self.resnets, stop):
            x = self._call(resnet, x, temb)
            skips.append(x)
        if stop is not None:
            return x, skips
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        if extra is not None:
            x = x + extra
            skips[-1] = x
        return x, skips


class CrossAttnDownBlock2D(_Block):
    has_cross_attention = True

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, groups, eps, add_downsample,
                 heads, cross_attention_dim, transformer_layers=1, use_linear_projection=False,
                 upcast_attention=False, downsample_padding=1, dropout=0.0):
        super().__init__()
        depth = _layers(transformer_layers, num_layers)
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps,
                           dropout=dropout) for i in range(num_layers)]
        )
        self.attentions = nn.ModuleList(
            [Transformer2DModel(heads, out_channels // heads, out_channels, depth[i], cross_attention_dim, groups,
                                use_linear_projection, upcast_attention, dropout) for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, downsample_padding)]) if add_downsample else None

    def forward(self, x, temb, context, extra: Optional[torch.Tensor] = None, stop: Optional[int] = None):
        skips = []
        last = len(self.resnets) - 1
        for i, (resnet, attn) in enumerate(zip(islice(self.resnets, stop), self.attentions)):
            x = self._call(attn, self._call(resnet, x, temb), context)
            if i == last and extra is not None:
                x = x + extra
            skips.append(x)
        if stop is not None:
            return x, skips
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(_Block):
    """resnet, then (transformer, resnet) pairs; resnets scaled by ``mid_block_scale_factor``."""

    def __init__(self, channels, temb_channels, groups, eps, heads, cross_attention_dim, transformer_layers=1,
                 use_linear_projection=False, upcast_attention=False, output_scale_factor=1.0, dropout=0.0,
                 num_layers=1):
        super().__init__()
        depth = _layers(transformer_layers, num_layers)

        def resnet():
            return ResnetBlock2D(channels, channels, temb_channels, groups, eps, output_scale_factor, dropout)

        self.attentions = nn.ModuleList(
            [Transformer2DModel(heads, channels // heads, channels, depth[i], cross_attention_dim, groups,
                                use_linear_projection, upcast_attention, dropout) for i in range(num_layers)]
        )
        self.resnets = nn.ModuleList([resnet() for _ in range(num_layers + 1)])

    def forward(self, x, temb, context):
        x = self._call(self.resnets[0], x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = self._call(resnet, self._call(attn, x, context), temb)
        return x


class UpBlock2D(_Block):
    has_cross_attention = False

    def __init__(self, in_channels, prev_output_channel, out_channels, temb_channels, num_layers, groups, eps,
                 add_upsample, dropout=0.0, **_):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D((prev_output_channel if i == 0 else out_channels)
                           + (in_channels if i == num_layers - 1 else out_channels),
                           out_channels, temb_channels, groups, eps, dropout=dropout) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x, skips: Sequence[torch.Tensor], temb, context=None, upsample_size=None, start=0, stop=None):
        for resnet, skip in zip(islice(self.resnets, start, stop), reversed(skips)):
            x = self._call(resnet, torch.cat([x, skip], dim=1), temb)
        if self.upsamplers is not None and stop is None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class CrossAttnUpBlock2D(_Block):
    has_cross_attention = True

    def __init__(self, in_channels, prev_output_channel, out_channels, temb_channels, num_layers, groups, eps,
                 add_upsample, heads, cross_attention_dim, transformer_layers=1, use_linear_projection=False,
                 upcast_attention=False, dropout=0.0):
        super().__init__()
        depth = _layers(transformer_layers, num_layers)
        self.resnets = nn.ModuleList(
            [ResnetBlock2D((prev_output_channel if i == 0 else out_channels)
                           + (in_channels if i == num_layers - 1 else out_channels),
                           out_channels, temb_channels, groups, eps, dropout=dropout) for i in range(num_layers)]
        )
        self.attentions = nn.ModuleList(
            [Transformer2DModel(heads, out_channels // heads, out_channels, depth[i], cross_attention_dim, groups,
                                use_linear_projection, upcast_attention, dropout) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x, skips: Sequence[torch.Tensor], temb, context, upsample_size=None, start=0, stop=None):
        layers = zip(islice(self.resnets, start, stop), islice(self.attentions, start, None), reversed(skips))
        for resnet, attn, skip in layers:
            x = self._call(attn, self._call(resnet, torch.cat([x, skip], dim=1), temb), context)
        if self.upsamplers is not None and stop is None:
            x = self.upsamplers[0](x, upsample_size)
        return x


DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "CrossAttnDownBlock2D": CrossAttnDownBlock2D}
UP_BLOCKS = {"UpBlock2D": UpBlock2D, "CrossAttnUpBlock2D": CrossAttnUpBlock2D}
