"""The spatial transformer of the UNet: group norm, project in, N transformer blocks
(self-attention, cross-attention, GEGLU feed-forward), project out, residual."""
from __future__ import annotations


from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention

TokenMap = Callable[[torch.Tensor], torch.Tensor]


def keep(x: torch.Tensor) -> torch.Tensor:
    """The identity token map: a sub-layer that merges nothing."""
    return x


NO_MERGE = ((keep, keep),) * 3


class GEGLU(nn.Module):
    """``a * gelu(gate)`` where ``a, gate`` are the two halves of one projection."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x width; ``net`` = [GEGLU, Dropout, Linear] as in diffusers."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: ``x += attn1(norm1(x))``; ``x += attn2(norm2(x), context)``; ``x += ff(norm3(x))``.

    ``token_merge`` (a plain attribute, None by default; set by a control for one run, e.g.
    ToMe) lets the sub-layers run on fewer tokens: ``token_merge(x)`` returns a ``(merge,
    unmerge)`` pair of token maps for each of attn1, attn2 and ff, and each computes
    ``x += unmerge(sublayer(merge(norm(x))))``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(dim, heads, dim_head, upcast_attention=upcast_attention, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn2 = Attention(
            dim, heads, dim_head, cross_attention_dim=cross_attention_dim, upcast_attention=upcast_attention,
            dropout=dropout,
        )
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, dropout=dropout)
        self.token_merge: Optional[Callable[[torch.Tensor], tuple[tuple[TokenMap, TokenMap], ...]]] = None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        (m1, u1), (m2, u2), (m3, u3) = NO_MERGE if self.token_merge is None else self.token_merge(x)
        x = u1(self.attn1(m1(self.norm1(x)))) + x
        x = u2(self.attn2(m2(self.norm2(x)), encoder_hidden_states=context)) + x
        return u3(self.ff(m3(self.norm3(x)))) + x


class Transformer2DModel(nn.Module):
    """Image features ``(B, C, H, W)`` through ``num_layers`` transformer blocks over the
    ``H*W`` tokens. SD1 projects with 1x1 convs, SD2/SDXL with linears (``use_linear_projection``)."""

    def __init__(
        self,
        heads: int,
        dim_head: int,
        in_channels: int,
        num_layers: int,
        cross_attention_dim: int,
        norm_num_groups: int,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner)
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, kernel_size=1)
            self.proj_out = nn.Conv2d(inner, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, upcast_attention, dropout=dropout)
                for _ in range(num_layers)
            ]
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear_projection:
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
            x = self.proj_in(x)
        else:
            x = self.proj_in(x)
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear_projection:
            x = self.proj_out(x)
            x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        else:
            x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
            x = self.proj_out(x)
        return x + residual
