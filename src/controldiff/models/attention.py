"""Attention with addressable sites and per-call processors.

One ``Attention`` class serves the UNet transformer blocks (``attn1`` self-attention,
``attn2`` cross-attention) and the VAE mid-block (spatial input, group norm, residual).
Parameter names equal diffusers' (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``group_norm``).

Controls change attention through *processors*: a callable
``proc(attn, hidden_states, encoder_hidden_states=None, attention_mask=None) -> Tensor``
that replaces the computation of one module. Processors are attached for the duration
of a ``with`` block only (:func:`use_processors`); nothing is patched globally.

Writing a processor: the module offers the steps of its own default computation, so a
processor only rewrites the step it cares about::

    def sag_processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        q, k, v = attn.project_qkv(hidden_states, encoder_hidden_states)
        probs = attn.probs(q, k, attention_mask)     # (B, heads, Nq, Nk), softmaxed
        store.append(probs)
        return attn.project_out(probs @ v)

    def pag_processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        n = hidden_states.shape[0] // 2               # perturb the second half of the batch
        normal = attn.default(hidden_states[:n])
        _, _, v = attn.project_qkv(hidden_states[n:])
        return torch.cat([normal, attn.project_out(v)])   # identity attention map
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AttentionSite:
    """Where an attention module sits in the UNet, so controls can pick sites by meaning.

    ``name`` is the module path (``down_blocks.0.attentions.1.transformer_blocks.0.attn2``);
    ``block`` is "down", "mid" or "up"; ``block_index`` the index in ``down_blocks``/``up_blocks``
    (0 for mid); ``attention_index`` the index in the block's ``attentions``;
    ``transformer_index`` the index in ``transformer_blocks``; ``kind`` "self" or "cross".
    """

    name: str
    block: str
    block_index: int
    attention_index: int
    transformer_index: int
    kind: str

    _PATTERN = re.compile(
        r"^(?:(down|up)_blocks\.(\d+)|(mid)_block)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn([12])$"
    )

    @classmethod
    def from_name(cls, name: str) -> Optional["AttentionSite"]:
        """Parse a UNet module path; None for paths that are not transformer attention."""
        m = cls._PATTERN.match(name)
        if m is None:
            return None
        updown, index, mid, attention, transformer, which = m.groups()
        return cls(
            name=name,
            block=updown or mid,
            block_index=int(index) if index is not None else 0,
            attention_index=int(attention),
            transformer_index=int(transformer),
            kind="self" if which == "1" else "cross",
        )


    def grid(self, height: int, width: int, levels: int) -> tuple[int, int]:
        """(h, w) of this site's token grid for latents of ``height`` x ``width`` in a UNet of
        ``levels`` resolutions (``len(block_out_channels)``): halved, rounded up, per level."""
        times = {"down": self.block_index, "mid": levels - 1, "up": levels - 1 - self.block_index}[self.block]
        for _ in range(times):   # stride-2 convolutions
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        return height, width


class Processor(Protocol):
    """Replaces the computation of one attention module; returns what ``attn.default`` would."""

    def __call__(
        self,
        attn: "Attention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor: ...


class Attention(nn.Module):
    """Multi-head attention, computed with ``F.scaled_dot_product_attention`` by default.

    ``upcast_attention`` / ``upcast_softmax`` are honoured where diffusers honours them:
    in :meth:`probs` (the explicit-softmax path, like diffusers' ``get_attention_scores``).
    The default SDPA path computes in the input dtype, exactly like diffusers'
    ``AttnProcessor2_0`` (its default), so outputs match the reference in every dtype.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: Optional[int] = None,
        bias: bool = False,
        out_bias: bool = True,
        upcast_attention: bool = False,
        upcast_softmax: bool = False,
        norm_num_groups: Optional[int] = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.is_cross_attention = cross_attention_dim is not None
        self.upcast_attention = upcast_attention
        self.upcast_softmax = upcast_softmax
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = (
            nn.GroupNorm(num_groups=norm_num_groups, num_channels=query_dim, eps=eps, affine=True)
            if norm_num_groups is not None
            else None
        )
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])
        # Plain attributes (not buffers, not submodules): set by the owning model / a `with`.
        self.site: Optional[AttentionSite] = None
        self.processor: Optional[Processor] = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if self.processor is not None:
            return self.processor(
                self, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask
            )
        return self.default(hidden_states, encoder_hidden_states, attention_mask)

    # ---- the default computation, and its steps for processors to reuse ----

    def default(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The unmodified computation. Token input ``(B, N, C)`` -> ``(B, N, C)``; spatial input
        ``(B, C, H, W)`` (VAE) is flattened, group-normed, attended, reshaped, residual-added."""
        if hidden_states.ndim == 4:
            return self._spatial(hidden_states, encoder_hidden_states, attention_mask)
        q, k, v = self.project_qkv(hidden_states, encoder_hidden_states)
        return self.project_out(self.attend(q, k, v, attention_mask))

    def _spatial(self, x: torch.Tensor, encoder_hidden_states, attention_mask) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.view(b, c, h * w).transpose(1, 2)
        if self.group_norm is not None:
            tokens = self.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        q, k, v = self.project_qkv(tokens, encoder_hidden_states)
        out = self.project_out(self.attend(q, k, v, attention_mask))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        if self.residual_connection:
            out = out + x
        return out / self.rescale_output_factor

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, heads*d)`` -> ``(B, heads, N, d)``."""
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, heads, N, d)`` -> ``(B, N, heads*d)``."""
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def project_qkv(self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None):
        """Queries from ``hidden_states``, keys/values from ``encoder_hidden_states`` (or
        ``hidden_states`` for self-attention); each ``(B, heads, N, d)``."""
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = self.split_heads(self.to_q(hidden_states))
        k = self.split_heads(self.to_k(context))
        v = self.split_heads(self.to_v(context))
        return q, k, v

    def attend(self, q, k, v, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Softmax attention with SDPA; ``attention_mask`` is an additive bias (or bool mask)
        broadcastable to ``(B, heads, Nq, Nk)``. Returns ``(B, heads, Nq, d)``."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)

    def probs(self, q, k, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention probabilities ``(B, heads, Nq, Nk)`` (for controls that read or edit
        attention maps). Upcasts like diffusers' ``get_attention_scores``; ``probs @ v`` then
        equals :meth:`attend` up to rounding."""
        dtype = q.dtype
        if self.upcast_attention:
            q, k = q.float(), k.float()
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        if self.upcast_softmax:
            scores = scores.float()
        return scores.softmax(dim=-1).to(dtype)

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        """Merge heads ``(B, heads, N, d)`` and apply the output projection -> ``(B, N, C)``."""
        return self.to_out[1](self.to_out[0](self.merge_heads(x)))


def find_sites(model: nn.Module) -> dict[str, Attention]:
    """Name every transformer attention module of a UNet-shaped model and set its ``site``."""
    sites = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            site = AttentionSite.from_name(name)
            if site is not None:
                module.site = site
                sites[name] = module
    return sites


@contextlib.contextmanager
def use_processors(sites: Mapping[str, Attention], processors: Mapping[str, Optional[Processor]]) -> Iterator[None]:
    """Attach ``processors`` (site name -> processor; None = default) for the ``with`` body.

    Previous processors are restored on exit, exceptions included, so uses nest. An unknown
    name raises ``ValueError`` before anything is attached."""
    for name in processors:
        if name not in sites:
            raise ValueError(
                f"attention_processors: unknown attention site {name!r} "
                f"(see unet.attention_sites() for the {len(sites)} valid names)"
            )
    saved = {name: sites[name].processor for name in processors}
    try:
        for name, proc in processors.items():
            sites[name].processor = proc
        yield
    finally:
        for name, proc in saved.items():
            sites[name].processor = proc
