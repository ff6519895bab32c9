"""Attend-and-Excite (Chefer et al. 2023), as diffusers' ``StableDiffusionAttendAndExcitePipeline``.

Before each scheduler step the latents take a gradient step that raises the attention
of the subject tokens: one UNet pass on the "cond" text of every image reads the
cross-attention maps of size ``attn_res`` (down, mid and up sites, heads and layers
averaged), softmaxes them over the prompt tokens (x100, first and last position left
out), smooths each subject token's map with the reference's 3x3 Gaussian and takes its
maximum; an image's loss is ``max(0, 1 - smallest of those maxima)``. At a step of
``thresholds`` the step is repeated (at most 20 times) while the loss is above
``1 - threshold``, then the maps are read once more for the regular step.

Same numbers as the reference, less work: one pass for all images instead of one per
image, cut short after the last site it reads (the rest of the UNet would not change the
loss); explicit-softmax maps only at those sites (every other attention keeps its SDPA
path); refinement passes only for the images still under their threshold, the first one
being the step's own pass. No pass where the reference's changes nothing (steps past
``max_iter_to_alter``, except refinement at threshold steps, and ``scale_factor=0``).

Reference behaviours kept: the UNet input of these passes is the raw latents, not
``scheduler.scale_model_input`` of them (a difference for Euler-type schedulers only);
refinement also runs at threshold steps past ``max_iter_to_alter``; the softmax keeps
EOS and padding positions; with ``attn_res=None`` the size is (ceil(width/32),
ceil(height/32)), width first, and sites are matched by their number of positions.
"""
from __future__ import annotations

import math
from numbers import Integral
from types import MappingProxyType
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import is_number
from ..sampling.control import Control, default_processor
from ..text.encode import TextCond
from ..text.tokens import NO_TOKEN

REFINEMENT_STEPS = 20   # the reference's max_refinement_steps
DEFAULT_THRESHOLDS = MappingProxyType({0: 0.05, 10: 0.5, 20: 0.8})   # the reference's (read-only)
Token = Union[int, str]


class _MapsRead(Exception):
    """Raised by the last site read: the rest of the UNet pass is not needed."""


def gaussian_kernel(kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The reference's ``GaussianSmoothing`` weight (1, 1, k, k). Its exponent is
    ``((x - mean) / (2 * sigma)) ** 2``, i.e. a Gaussian of width sigma * sqrt(2): kept."""
    kernel = 1
    grids = torch.meshgrid([torch.arange(kernel_size, dtype=torch.float32)] * 2, indexing="ij")
    for grid in grids:
        mean = (kernel_size - 1) / 2
        kernel = kernel * (1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((grid - mean) / (2 * sigma)) ** 2)))
    return (kernel / torch.sum(kernel)).view(1, 1, kernel_size, kernel_size)


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _check_tokens(items, name: str) -> list:
    if not isinstance(items, (list, tuple)) or not items or not all(_is_int(v) or isinstance(v, str) for v in items):
        raise ValueError(f"{name}: expected a non-empty list of token positions (int) or words (str), got {items!r}")
    if any(isinstance(v, str) and not v.strip() for v in items):
        raise ValueError(f"{name}: expected words, got an empty one in {items!r}")
    return [int(v) if _is_int(v) else v for v in items]


class AttendAndExcite(Control):
    """``token_indices``: the subject tokens, as positions in the tokenized prompt (BOS at 0,
    as the reference) or words of the prompt (all their tokens, every occurrence); one list
    for every prompt, or a list of lists, one per prompt of the batch.

    ``max_iter_to_alter``: the steps with index below it take the gradient step;
    ``thresholds``: step index -> the max attention the refinement aims for at that step
    (``{}``: none); ``scale_factor``: the step size, times sqrt(linspace(1, 0.5)) over the
    run; ``attn_res``: the map size read, (16, 16) for SD1/SD2 at 512 px, (32, 32) for SDXL
    at 1024 px; None: the reference's (ceil(width / 32), ceil(height / 32)).
    """

    def __init__(self, token_indices: Union[Sequence[Token], Sequence[Sequence[Token]]],
                 max_iter_to_alter: int = 25, thresholds: Mapping[int, float] = DEFAULT_THRESHOLDS,
                 scale_factor: float = 20, attn_res: Optional[tuple] = (16, 16)):
        nested = isinstance(token_indices, (list, tuple)) and bool(token_indices) and all(
            isinstance(v, (list, tuple)) for v in token_indices)
        if nested:
            token_indices = [_check_tokens(v, f"token_indices[{i}]") for i, v in enumerate(token_indices)]
        else:
            token_indices = _check_tokens(token_indices, "token_indices")
        if not _is_int(max_iter_to_alter) or max_iter_to_alter < 0:
            raise ValueError(f"max_iter_to_alter: expected a non-negative integer, got {max_iter_to_alter!r}")
        if not isinstance(thresholds, Mapping):
            raise ValueError(f"thresholds: expected a dict of step index -> threshold, got {thresholds!r}")
        for k, v in thresholds.items():
            if not _is_int(k) or k < 0:
                raise ValueError(f"thresholds: expected non-negative integer step indices as keys, got {k!r}")
            if not is_number(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"thresholds: expected thresholds in [0, 1], got {v!r} at step {k}")
        if not is_number(scale_factor) or scale_factor < 0:
            raise ValueError(f"scale_factor: expected a non-negative finite number, got {scale_factor!r}")
        if attn_res is not None:
            if not isinstance(attn_res, (list, tuple)) or len(attn_res) != 2 or not all(
                    _is_int(v) and v >= 2 for v in attn_res):
                raise ValueError(f"attn_res: expected None or (height, width), two integers >= 2, got {attn_res!r}")
            attn_res = tuple(int(v) for v in attn_res)
        self.token_indices = token_indices
        self.max_iter_to_alter = int(max_iter_to_alter)
        self.thresholds = {int(k): float(v) for k, v in thresholds.items()}
        self.scale_factor = float(scale_factor)
        self.attn_res = attn_res

    # ------------------------------------------------------------------ setup
    def setup(self, ctx):
        self._res = self._resolution(ctx)
        self._sites = self._pick_sites(ctx, self._res)
        self._last = [n for n in ctx.unet.attention_sites() if n in self._sites][-1]   # in execution order
        rows = self._resolve_tokens(ctx)
        k = max(len(r) for r in rows)
        self._index = torch.tensor([r + [1] * (k - len(r)) for r in rows], device=ctx.device) - 1  # BOS cut off
        self._used = torch.tensor([[True] * len(r) + [False] * (k - len(r)) for r in rows], device=ctx.device)
        self._kernel = gaussian_kernel().to(ctx.device)
        scale_range = np.linspace(1.0, 0.5, ctx.steps)
        self._step_size = self.scale_factor * np.sqrt(scale_range)

    def teardown(self, ctx):
        self._index = self._used = self._kernel = None

    def _resolution(self, ctx) -> tuple[int, int]:
        if self.attn_res is not None:
            return self.attn_res
        res = (math.ceil(ctx.width / 32), math.ceil(ctx.height / 32))   # the reference's default: width first
        if min(res) < 2:
            raise ValueError(f"attn_res: None gives {res} at {ctx.height}x{ctx.width}; pass a size of at least 2x2")
        return res

    @staticmethod
    def _pick_sites(ctx, res) -> list[str]:
        """The cross-attention sites with as many positions as ``res`` (the reference's test),
        in the reference's order of averaging: up, down, mid."""
        f = ctx.vae.latent_factor if ctx.vae is not None else 8
        blocks = len(ctx.unet.config.block_out_channels)
        sizes = {}
        for name, attn in ctx.unet.attention_sites().items():
            site = attn.site
            if site.kind != "cross":
                continue
            sizes[name] = site.grid(ctx.height // f, ctx.width // f, blocks)
        picked = [n for n, (h, w) in sizes.items() if h * w == res[0] * res[1]]
        if not picked:
            have = ", ".join(f"({h}, {w})" for h, w in sorted(set(sizes.values()), reverse=True))
            raise ValueError(f"attn_res: {res} matches no cross-attention map of this UNet at "
                             f"{ctx.height}x{ctx.width} pixels; its maps are {have or 'none'}")
        order = {"up": 0, "down": 1, "mid": 2}
        return sorted(picked, key=lambda n: order[ctx.unet.attention_sites()[n].site.block])

    def _resolve_tokens(self, ctx) -> list[list[int]]:
        """Each batch row's subject positions, checked against its prompt's tokens."""
        cond, batch = ctx.text["cond"], ctx.batch
        ids = None if cond.ids is None else cond.ids.tolist()
        nested = isinstance(self.token_indices[0], list)
        groups = self.token_indices if nested else [self.token_indices]
        if batch % len(groups):
            raise ValueError(f"token_indices: got {len(groups)} lists for a batch of {batch} images; "
                             "give one list per prompt")
        per = batch // len(groups)
        if nested and ids is not None and any(ids[r] != ids[r - r % per] for r in range(batch)):
            raise ValueError(f"token_indices: {len(groups)} list(s) for {batch} images, but the images do not "
                             f"come in {len(groups)} group(s) of one prompt; give one list per prompt")
        rows = []
        for r in range(batch):
            who = f"prompt {r // per}" if nested else f"the prompt of image {r}"
            tokens = [i for i, t in enumerate(ids[r]) if t != NO_TOKEN] if ids is not None else None
            out = []
            for item in groups[r // per if nested else 0]:
                if isinstance(item, str):
                    found = ctx.token_indices(item, row=r)
                    if not found:
                        raise ValueError(f"token_indices: {item!r} is not a word of {who}")
                    out += found
                    continue
                if not 0 < item < cond.length - 1 or (tokens is not None and item not in tokens):
                    where = f"positions {tokens[0]}..{tokens[-1]}" if tokens else "none"
                    raise ValueError(f"token_indices: position {item} of {who} is not a prompt token "
                                     f"(0 is BOS; this prompt's tokens are at {where})")
                out.append(item)
            rows.append(out)
        return rows

    # ------------------------------------------------------------------ the update
    def before_step(self, ctx, step, latents):
        i = step.index
        threshold = self.thresholds.get(i)
        alter = i < self.max_iter_to_alter
        if self.scale_factor == 0 or not (alter or threshold is not None):
            return latents
        size = float(self._step_size[i])
        every = torch.arange(latents.shape[0], device=latents.device)
        with torch.enable_grad():
            loss, grad = self._loss_grad(ctx, step, latents, every)
            x = latents
            if threshold is not None:
                refine = loss > 1.0 - threshold
                if bool(refine.any()):
                    rows = every[refine]
                    xr, lr, gr = self._refine(ctx, step, latents[rows], rows, loss[rows], grad[rows],
                                              max(0.0, 1.0 - threshold), size, alter)
                    x, loss, grad = x.clone(), loss.clone(), grad.clone()
                    x[rows], loss[rows], grad[rows] = xr, lr, gr
            if alter:
                x = torch.where((loss > 0).view(-1, 1, 1, 1), x - size * grad, x)
        return x.detach()

    def _refine(self, ctx, step, x, rows, loss, grad, target, size, alter):
        """The reference's iterative refinement for the images ``rows`` (their first pass done)."""
        active = torch.ones_like(loss, dtype=torch.bool)
        for iteration in range(1, REFINEMENT_STEPS + 1):
            if iteration > 1:
                loss, grad = loss.clone(), grad.clone()
                loss[active], grad[active] = self._loss_grad(ctx, step, x[active], rows[active])
            x = torch.where((active & (loss > 0)).view(-1, 1, 1, 1), x - size * grad, x)
            active = active & (loss > target)
            if not bool(active.any()):
                break
        if alter:   # the pass the regular step takes its gradient from (the reference's result is unused otherwise)
            loss, grad = self._loss_grad(ctx, step, x, rows)
        return x, loss, grad

    def _loss_grad(self, ctx, step, x, rows):
        """Per image: the loss ``max(0, 1 - min max attention)`` and its gradient in ``x``."""
        x = x.detach().requires_grad_(True)
        best = (1.0 - self.max_attention(ctx, step, x, rows)).max(dim=1).values
        loss = torch.where(best > 0, best, torch.zeros_like(best))
        grad = torch.autograd.grad(loss.sum(), x)[0] if bool((loss > 0).any()) else torch.zeros_like(x)
        return loss.detach(), grad

    def max_attention(self, ctx, step, x, rows=None) -> torch.Tensor:
        """(images, tokens): each subject token's smoothed maximum attention at latents ``x``
        (rows ``rows`` of the batch), the quantity the loss raises; +inf for padding entries
        where images have fewer tokens than others."""
        if rows is None:
            rows = torch.arange(x.shape[0], device=x.device)
        maps = self._read_maps(ctx, step, x, rows)
        r0, r1 = self._res
        b = x.shape[0]
        stack = torch.cat([maps[n].reshape(b, -1, r0, r1, maps[n].shape[-1]) for n in self._sites], dim=1)
        mean = stack.sum(1) / stack.shape[1]
        text = torch.softmax(mean[..., 1:-1] * 100, dim=-1)          # (b, r0, r1, tokens - 2)
        idx = self._index[rows]
        picked = text.permute(0, 3, 1, 2).gather(1, idx[:, :, None, None].expand(-1, -1, r0, r1))
        padded = F.pad(picked.reshape(-1, 1, r0, r1), (1, 1, 1, 1), mode="reflect")
        smooth = F.conv2d(padded, self._kernel.to(padded.dtype))
        top = smooth.reshape(b, idx.shape[1], -1).amax(dim=-1)
        return top.masked_fill(~self._used[rows], float("inf"))

    def _read_maps(self, ctx, step, x, rows) -> dict:
        """One UNet pass on the "cond" text of ``rows``; the cross-attention maps at the picked sites."""
        maps: dict = {}
        last = self._last

        def wrap(name):
            def read(inner):
                def processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
                    if hidden_states.shape[1] != self._res[0] * self._res[1]:
                        raise RuntimeError(f"AttendAndExcite: {name} has {hidden_states.shape[1]} positions, "
                                           f"expected {self._res}")
                    q = attn.split_heads(attn.to_q(hidden_states))
                    k = attn.split_heads(attn.to_k(encoder_hidden_states))
                    maps[name] = attn.probs(q, k, attention_mask)
                    if name == last:
                        raise _MapsRead
                    return inner(attn, hidden_states, encoder_hidden_states, attention_mask)
                return processor
            return read

        cond = ctx.text["cond"]
        text = TextCond(cond.embeds[rows], None if cond.pooled is None else cond.pooled[rows])
        time_ids = None
        if ctx.time_ids is not None:
            ids = ctx.time_ids if ctx.time_ids.shape[0] == ctx.batch else ctx.time_ids.repeat(ctx.batch, 1)
            time_ids = ids[rows]
        inp = x if ctx.concat is None else torch.cat([x, ctx.concat[rows].to(x.dtype)], dim=1)
        try:
            ctx.run_unet(inp, step.t, text, time_ids=time_ids,
                         processors={n: wrap(n)(default_processor) for n in self._sites})
        except _MapsRead:
            pass
        if len(maps) != len(self._sites):
            raise RuntimeError("AttendAndExcite: not every cross-attention map was read in this pass")
        return maps
