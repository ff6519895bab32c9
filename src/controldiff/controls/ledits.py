"""LEDITS++ (Brack et al. 2024): SEGA-style editing with implicit masks, for real images.

Extends :class:`~controldiff.controls.sega.SEGA`: the same ``Concept`` branches in the one
batched UNet call and the same guidance term (concept minus base, reversed, scaled), but as
diffusers' ``LEditsPPPipelineStableDiffusion(XL)`` combines them:

- the base is the unconditional prediction: "uncond" with CFG on; with guidance off the
  prompt's "cond" (the reference has no prompt: its base is the negative prompt's);
- each concept acts from its own ``warmup`` to its ``cooldown``; no weights, no momentum;
- each concept's guidance is masked. ``use_intersect_mask`` (default on SD1/SD2, off on
  SDXL, as the two references): where the concept's
  cross-attention map (mean over heads and the down/up cross-attention layers at 1/4 of the
  latent size, tokens summed, 3x3 Gaussian-smoothed) is in its top ``1 - threshold`` AND the
  guidance's magnitude (summed over channels) is in its top ``1 - threshold``; SD1/SD2 use
  the attention mask alone above timestep 800, as the reference. ``use_cross_attn_mask``
  alone: the attention mask; neither: the magnitude mask. ``user_mask`` multiplies first.

With ``pipe.invert(image, method="ddpm")`` and ``pipe(prompt, inversion=inv, guidance_scale=1,
controls=[LEdits(...)])`` this is the reference pipeline. The maps are read by a processor at
those sites only, for the concept rows only, from the same call.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..checks import finite_number
from .attend_excite import gaussian_kernel  # the same 3x3 smoothing as the references share
from .sega import SEGA, Concept


def quantile(x: torch.Tensor, q: float, dim: int) -> torch.Tensor:
    """torch.quantile in float32 (it refuses half precision), back in x's dtype."""
    return torch.quantile(x.float(), q, dim=dim).to(x.dtype)


def rescale(pred: torch.Tensor, reference: torch.Tensor, factor: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, 3.4): match ``reference``'s std per sample, mixed by ``factor``."""
    dims = list(range(1, pred.ndim))
    rescaled = pred * (reference.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True))
    return factor * rescaled + (1 - factor) * pred


class LEdits(SEGA):
    """LEDITS++ editing over one or more concepts (a plain string is ``Concept(text, warmup=0)``)."""

    def __init__(self, concepts: Union[str, Concept, Sequence[Union[str, Concept]]],
                 use_cross_attn_mask: bool = False, use_intersect_mask: Optional[bool] = None,
                 user_mask: Optional[torch.Tensor] = None, guidance_rescale: float = 0.0):
        items = [concepts] if isinstance(concepts, (str, Concept)) else list(concepts)
        items = [Concept(c, warmup=0) if isinstance(c, str) else c for c in items]
        super().__init__(items)
        for c in self.concepts:
            if c.weight is not None:
                raise ValueError(f"Concept.weight: LEdits has no concept weights (SEGA's), got {c.weight} "
                                 f"for {c.prompt!r}")
        for name, value in (("use_cross_attn_mask", use_cross_attn_mask), ("use_intersect_mask", use_intersect_mask)):
            if not isinstance(value, bool) and (value is not None or name == "use_cross_attn_mask"):
                raise ValueError(f"{name}: expected True or False, got {value!r}")
        if user_mask is not None and not torch.is_tensor(user_mask):
            raise ValueError(f"user_mask: expected a tensor broadcastable to the latents, got {type(user_mask).__name__}")
        self.use_cross_attn_mask = use_cross_attn_mask
        self.use_intersect_mask = use_intersect_mask
        self.user_mask = user_mask
        self.guidance_rescale = finite_number(guidance_rescale, "guidance_rescale", 0.0)
        self._sites: dict[str, str] = {}   # site name -> "down" / "up"
        self._maps: dict[str, list] = {}
        self._mask = None
        self._intersect = bool(use_intersect_mask)

    @property
    def attention_masks(self) -> bool:
        return self.use_cross_attn_mask or self._intersect

    def setup(self, ctx):
        self.prepare_concepts(ctx)
        sdxl = ctx.info is not None and ctx.info.family == "sdxl"
        self._intersect = (not sdxl) if self.use_intersect_mask is None else self.use_intersect_mask
        self._late_intersect = not sdxl  # SD1/SD2: the intersection only at t <= 800
        f = ctx.vae.latent_factor if ctx.vae is not None else 8
        h, w = ctx.height // f, ctx.width // f
        self._res = (int(h / 4), int(w / 4))
        self._mask = None
        if self.user_mask is not None:
            m, shape = self.user_mask, (ctx.batch, 4, h, w)
            try:
                fits = torch.broadcast_shapes(m.shape, shape) == shape
            except RuntimeError:
                fits = False
            if not fits or not bool(torch.isfinite(m).all()):
                raise ValueError(f"user_mask: expected finite values broadcastable to the latents "
                                 f"{(ctx.batch, 4, h, w)}, got shape {tuple(m.shape)}")
            self._mask = m.to(ctx.device, ctx.dtype)
        self._sites = {}
        if self.attention_masks:
            blocks = len(ctx.unet.config.block_out_channels)
            for name, attn in ctx.unet.attention_sites().items():
                s = attn.site
                if s.kind != "cross" or s.block == "mid":
                    continue
                if s.grid(h, w, blocks) == self._res:
                    self._sites[name] = s.block
            if not self._sites or min(self._res) < 2:
                raise ValueError(f"use_cross_attn_mask/use_intersect_mask: the attention masks read the down/up "
                                 f"cross-attention at 1/4 of the latent size ({self._res[0]}x{self._res[1]}), this "
                                 f"UNet has none at {h}x{w} latents; pass use_cross_attn_mask=False, "
                                 "use_intersect_mask=False")

    def teardown(self, ctx):
        self._maps = {}

    def prepare_call(self, ctx, step, call):
        if not self._sites:
            return
        if call.views is not None:
            raise ValueError("LEdits: the attention masks read whole-canvas maps, not views (MultiDiffusion); "
                             "pass use_cross_attn_mask=False, use_intersect_mask=False")
        names = list(dict.fromkeys(self.branch_name(c) for c in self.concepts))
        rows = {name: call.rows(name) for name in names}
        self._maps = {name: {"up": {}, "down": {}} for name in names}   # block -> site -> row parts
        tokens = self._res[0] * self._res[1]

        def wrap(site, block):
            def outer(inner):
                def read_maps(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
                    out = inner(attn, hidden_states, encoder_hidden_states, attention_mask)
                    if hidden_states.shape[1] == tokens:
                        for name, whole in rows.items():
                            r = call.local(whole)   # the part evaluated now: its maps join the site's
                            if r.start < r.stop:
                                q = attn.split_heads(attn.to_q(hidden_states[r]))
                                k = attn.split_heads(attn.to_k(encoder_hidden_states[r]))
                                self._maps[name][block].setdefault(site, []).append(attn.probs(q, k))
                    return out
                return read_maps
            return outer

        for site, block in self._sites.items():
            call.add_processor(site, wrap(site, block))

    def attention_mask(self, name: str, c: Concept, like: torch.Tensor) -> torch.Tensor:
        """The concept's cross-attention mask at latent size (the reference's M^1)."""
        h, w = self._res
        found = [torch.cat(parts) for block in ("up", "down") for parts in self._maps[name][block].values()]
        # (the reference's order: up sites, then down, each in call order)
        maps = torch.cat([m.reshape(m.shape[0], m.shape[1], h, w, m.shape[-1]) for m in found], dim=1)
        maps = maps.sum(1) / maps.shape[1]
        attn = maps[:, :, :, 1:maps.shape[-1] - 1].sum(dim=3)  # every token but the first and last (the reference's)
        attn = F.pad(attn.unsqueeze(1), (1, 1, 1, 1), mode="reflect")
        attn = F.conv2d(attn, gaussian_kernel().to(attn.device, attn.dtype)).squeeze(1)
        q = quantile(attn.flatten(start_dim=1), c.threshold, dim=1)
        mask = torch.where(attn >= q[:, None, None], 1.0, 0.0)
        return F.interpolate(mask.unsqueeze(1), like.shape[-2:]).repeat(1, like.shape[1], 1, 1).to(like.dtype)

    @staticmethod
    def magnitude_mask(guide: torch.Tensor, threshold: float) -> torch.Tensor:
        """1 where the guidance's channel-summed magnitude is in its top ``1 - threshold`` (M^2)."""
        mag = guide.abs().sum(dim=1, keepdim=True).repeat(1, guide.shape[1], 1, 1)
        q = quantile(mag.flatten(start_dim=2), threshold, dim=2)
        return torch.where(mag >= q[:, :, None, None], torch.ones_like(guide), torch.zeros_like(guide))

    def masked(self, step, name: str, c: Concept, guide: torch.Tensor) -> torch.Tensor:
        if self._mask is not None:
            guide = guide * self._mask
        if not self.attention_masks:
            return torch.where(self.magnitude_mask(guide, c.threshold) > 0, guide, torch.zeros_like(guide))
        attn = self.attention_mask(name, c, guide)
        if not self._intersect:
            return guide * attn
        if self._late_intersect and step.t > 800:
            return guide * attn
        return guide * (self.magnitude_mask(guide, c.threshold) * attn)

    def combine(self, ctx, step, preds, pred):
        base = preds["uncond"] if "uncond" in preds else preds["cond"]
        edit = torch.zeros_like(base)
        for c in self.concepts:
            if step.index < c.warmup or (c.cooldown is not None and step.index >= c.cooldown):
                continue
            edit += self.masked(step, self.branch_name(c), c, self.guidance(preds, base, c))
        pred = pred + edit
        if self.guidance_rescale > 0:  # towards the concepts' mean prediction's std (the reference crashes here)
            concepts = torch.stack([preds[self.branch_name(c)] for c in self.concepts])
            pred = rescale(pred, concepts.mean(dim=0), self.guidance_rescale)
        return pred
