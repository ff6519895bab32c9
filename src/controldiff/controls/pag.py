"""Perturbed-attention guidance (PAG), as diffusers' PAG pipelines.

An extra "perturbed" branch (the "cond" text) whose self-attention at the chosen
layers is the identity map (output = to_out(to_v(x))); ``combine`` adds
``scale(t) * (cond - perturbed)`` after CFG, which equals the reference's formula with
and without classifier-free guidance.

``layers`` use diffusers' identifiers: a regular expression searched in the module
paths of the UNet's self-attention ("mid", "down_blocks.1", "up_blocks.0.attentions.0",
"down_blocks.(1|2)"), with its guard against partial numeric matches. The older
identifiers ("down.block_1", "up.block_0.attentions_0") are accepted too.
"""
from __future__ import annotations

import re
from typing import Sequence, Union

import torch

from ..sampling.control import Branch, Control, default_processor

_LEGACY = re.compile(r"^(down|mid|up)(?:\.block_(\d+))?(?:\.attentions_(\d+))?$")


def _pattern(layer: str) -> str:
    """Translate an older identifier to the module-path regex; others are used as given."""
    m = _LEGACY.match(layer)
    if m is None or layer == "mid" or not (m.group(2) or m.group(3)):
        return layer
    kind, block, attention = m.groups()
    if kind == "mid":
        out = r"mid_block"
    else:
        out = rf"{kind}_blocks\.{block}\." if block is not None else rf"{kind}_blocks\.\d+\."
    if attention is not None:
        out += rf"attentions\.{attention}\."
    return out


def match_layers(names: Sequence[str], layers: Sequence[str]) -> list[str]:
    """Self-attention site names that ``layers`` select, with diffusers' rules
    (``re.search`` plus the "blocks.1 is not blocks.10" guard); ValueError for a layer
    that selects nothing."""
    picked: list[str] = []
    for layer in layers:
        pattern = _pattern(layer)
        tail = layer.split(".")[-1]
        found = []
        for name in names:
            last = name.split(".")[-1]
            fake = tail.isnumeric() and last.isnumeric() and tail == last
            if re.search(pattern, name) is not None and not fake:
                found.append(name)
        if not found:
            raise ValueError(f"layers: {layer!r} matches no self-attention layer of this UNet "
                             f"(module paths look like {names[0] if names else '?'!r})")
        picked += [n for n in found if n not in picked]
    return picked


class PAG(Control):
    def __init__(self, scale: float = 3.0, layers: Union[str, Sequence[str]] = ("mid",), adaptive_scale: float = 0.0):
        layers = (layers,) if isinstance(layers, str) else tuple(layers)
        if not all(isinstance(x, str) and x for x in layers):
            raise ValueError(f"layers: expected layer identifiers (strings), got {layers!r}")
        for name, v in (("scale", scale), ("adaptive_scale", adaptive_scale)):
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name}: expected a non-negative number, got {v!r}")
        self.scale = float(scale)
        self.layers = layers
        self.adaptive_scale = float(adaptive_scale)
        self.name = "pag:" + "|".join(layers)
        self.sites: list[str] = []

    @property
    def enabled(self) -> bool:
        return self.scale > 0 and len(self.layers) > 0

    def setup(self, ctx):
        selfattn = [n for n, a in ctx.unet.attention_sites().items() if a.site.kind == "self"]
        self.sites = match_layers(selfattn, self.layers)

    def branches(self, ctx, step):
        return [Branch(self.name, ctx.text["cond"])] if self.enabled else []

    def prepare_call(self, ctx, step, call):
        if not self.enabled:
            return
        whole = call.rows(self.name)

        def wrap(inner):
            def identity(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
                h, rows = hidden_states, call.local(whole)   # its rows in the part evaluated now
                if rows.start == rows.stop:
                    return inner(attn, h, encoder_hidden_states, attention_mask)
                perturbed = attn.to_out[1](attn.to_out[0](attn.to_v(h[rows])))
                if inner is default_processor:  # no attention for the perturbed rows
                    parts = [attn.default(p, encoder_hidden_states, attention_mask)
                             for p in (h[:rows.start], h[rows.stop:]) if p.shape[0]]
                    before = parts[0] if rows.start else None
                    after = parts[-1] if rows.stop < h.shape[0] else None
                else:  # another control's processor sees the whole batch, its rows where it expects them
                    out = inner(attn, h, encoder_hidden_states, attention_mask)
                    before, after = out[:rows.start], out[rows.stop:]
                return torch.cat([p for p in (before, perturbed, after) if p is not None and p.shape[0]])
            return identity

        for site in self.sites:
            call.add_processor(site, wrap)

    def current_scale(self, t):
        """The scale at timestep t: lowered by adaptive_scale per timestep below 1000."""
        if self.adaptive_scale > 0 and self.enabled:
            s = self.scale - self.adaptive_scale * (1000 - t)
            return s.clamp_min(0) if torch.is_tensor(s) else max(s, 0.0)
        return self.scale

    def combine(self, ctx, step, preds, pred):
        if not self.enabled:
            return pred
        return pred + self.current_scale(step.t) * (preds["cond"] - preds[self.name])
