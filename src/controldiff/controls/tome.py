"""Token merging for Stable Diffusion (ToMe, Bolya & Hoffman 2023), as ``tomesd.apply_patch``.

In each UNet transformer block at most ``max_downsample`` times below the latent
resolution, the block's input tokens (per image, i.e. per batch row) are split into
destinations, one per ``sx`` x ``sy`` cell, and sources; the ``ratio * N`` sources most
similar (cosine) to a destination are averaged into it before self-attention (and
cross-attention / the MLP when asked) and copied back out after.

Randomness, as tomesd: with ``use_rand`` each block call draws one destination per cell,
shared by every row of the call, from a generator of its own (tomesd forks the global
torch generator at its first merge); a call with an odd batch draws nothing and takes the
top-left of each cell (tomesd's rule, so prompted and unprompted rows stay alike).
``seed=s`` draws what tomesd draws after ``torch.manual_seed(s)``; ``seed=None`` forks the
global generator at the start of each run. A call the loop evaluates in parts (its memory
budget) draws once, as one call would.

Composition: the block hook merges around whatever processors other controls attach, so
they see the merged tokens exactly as diffusers' processors do under tomesd (PAG,
FABRIC, ControlNet, SEGA, MultiDiffusion views). Refused in setup: SAG when the mid
block's self-attention is merged (its map must cover the token grid) and
Attend-and-Excite when ``merge_crossattn`` merges the sites whose maps it reads.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..checks import is_number, positive_int
from ..models.transformer import NO_MERGE, BasicTransformerBlock, keep
from ..sampling.control import Control
from .attend_excite import AttendAndExcite
from .sag import SAG, SITE as SAG_SITE


def draw_pick(h: int, w: int, sx: int, sy: int, generator: torch.Generator) -> torch.Tensor:
    """One destination per sx x sy cell of an h x w grid, drawn as tomesd draws it."""
    return torch.randint(sy * sx, size=(h // sy, w // sx, 1), device=generator.device, generator=generator)


def bipartite_merge(metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int,
                    generator: Optional[torch.Generator] = None, pick: Optional[torch.Tensor] = None):
    """(merge, unmerge) token maps for tokens ``metric`` (B, N, C) on an h x w grid: ``r``
    sources merged into their most similar destination (one per sx x sy cell: the top-left,
    or drawn with ``generator``). tomesd's ``bipartite_soft_matching_random2d``, op for op
    (its sorts are not stable: the same calls keep the same order of ties)."""
    b, n, _ = metric.shape
    with torch.no_grad():
        hsy, wsx = h // sy, w // sx
        if pick is not None:   # drawn already (for an earlier part of the same call)
            pick = pick.to(metric.device)
        elif generator is None:
            pick = torch.zeros(hsy, wsx, 1, device=metric.device, dtype=torch.int64)
        else:
            pick = draw_pick(h, w, sx, sy, generator).to(metric.device)
        cells = torch.zeros(hsy, wsx, sy * sx, device=metric.device, dtype=torch.int64)
        cells.scatter_(dim=2, index=pick, src=-torch.ones_like(pick))
        grid = torch.zeros(h, w, device=metric.device, dtype=torch.int64)   # cells cut off at the edges: sources
        grid[:hsy * sy, :wsx * sx] = cells.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
        order = grid.reshape(1, -1, 1).argsort(dim=1)   # destinations (-1) first, then sources
        num_dst = hsy * wsx
        a_idx, b_idx = order[:, num_dst:, :], order[:, :num_dst, :]

        def split(x):
            c = x.shape[-1]
            return x.gather(1, a_idx.expand(b, n - num_dst, c)), x.gather(1, b_idx.expand(b, num_dst, c))

        unit = metric / metric.norm(dim=-1, keepdim=True)
        src_unit, dst_unit = split(unit)
        scores = src_unit @ dst_unit.transpose(-1, -2)
        r = min(src_unit.shape[1], r)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(-2, src_idx)
        unm_pos = a_idx.expand(b, a_idx.shape[1], 1).gather(1, unm_idx)   # their token positions
        src_pos = a_idx.expand(b, a_idx.shape[1], 1).gather(1, src_idx)

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = split(x)
        rows, t1, c = src.shape
        unm = src.gather(-2, unm_idx.expand(rows, t1 - r, c))
        src = src.gather(-2, src_idx.expand(rows, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(rows, r, c), src, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        unm, dst = x[..., :unm_len, :], x[..., unm_len:, :]
        c = unm.shape[-1]
        src = dst.gather(-2, dst_idx.expand(b, r, c))
        out = torch.zeros(b, n, c, device=x.device, dtype=x.dtype)
        out.scatter_(-2, b_idx.expand(b, num_dst, c), dst)
        out.scatter_(-2, unm_pos.expand(b, unm_len, c), unm)
        out.scatter_(-2, src_pos.expand(b, r, c), src)
        return out

    return merge, unmerge


def downsample(size: tuple[int, int], tokens: int) -> int:
    """How many times below the UNet input ``size`` (h, w) a grid of ``tokens`` lies (tomesd's
    rounding: 1, 2, 4, 8 for the levels of an SD UNet)."""
    return int(math.ceil(math.sqrt(size[0] * size[1] // tokens)))


def _generator(device: torch.device, seed: Optional[int]) -> torch.Generator:
    """A generator on the device tomesd draws on: seeded, else forked from the global one."""
    on = device if device.type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=on)
    if seed is not None:
        return g.manual_seed(seed)
    return g.set_state(torch.cuda.get_rng_state(on) if on.type == "cuda" else torch.get_rng_state())


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


class ToMe(Control):
    """Merge ``ratio`` of the tokens in the high-resolution transformer blocks (faster
    self-attention at large sizes); arguments and defaults as ``tomesd.apply_patch``."""

    def __init__(self, ratio: float = 0.5, max_downsample: int = 1, sx: int = 2, sy: int = 2,
                 use_rand: bool = True, merge_attn: bool = True, merge_crossattn: bool = False,
                 merge_mlp: bool = False, seed: Optional[int] = None):
        if not is_number(ratio) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio: expected a fraction of the tokens in [0, 1), got {ratio!r}")
        self.ratio = float(ratio)
        self.max_downsample = positive_int(max_downsample, "max_downsample")
        self.sx, self.sy = positive_int(sx, "sx"), positive_int(sy, "sy")
        self.use_rand = _flag(use_rand, "use_rand")
        self.merge_attn = _flag(merge_attn, "merge_attn")
        self.merge_crossattn = _flag(merge_crossattn, "merge_crossattn")
        self.merge_mlp = _flag(merge_mlp, "merge_mlp")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed: expected None (fork the global torch generator) or an integer, got {seed!r}")
        self.seed = seed
        self._blocks: list = []
        self._hook = None
        self._size: tuple[int, int] = (0, 0)
        self._gen: Optional[torch.Generator] = None
        self._call = None           # the loop's call being prepared / evaluated
        self._draws: list = []      # its blocks' draws, replayed when the loop evaluates it in parts
        self._k = 0                 # block calls of this UNet evaluation

    def merges(self, size: tuple[int, int], tokens: int) -> bool:
        """Whether a block of ``tokens`` tokens in a UNet call of latent ``size`` merges any."""
        return downsample(size, tokens) <= self.max_downsample and int(tokens * self.ratio) > 0

    def setup(self, ctx):
        f = ctx.vae.latent_factor if ctx.vae is not None else 8
        size = (ctx.height // f, ctx.width // f)
        if size[0] < self.sy or size[1] < self.sx:
            raise ValueError(f"sx, sy: the stride ({self.sx}, {self.sy}) is larger than the latent grid {size}")
        self._refuse(ctx, size)
        self._blocks = [m for m in ctx.unet.modules() if isinstance(m, BasicTransformerBlock)]
        if any(b.token_merge is not None for b in self._blocks):
            raise ValueError("controls: the UNet's tokens are merged already (one ToMe per run)")
        self._gen = _generator(ctx.device, self.seed) if self.use_rand else None
        for b in self._blocks:
            b.token_merge = self
        self._hook = ctx.unet.register_forward_pre_hook(self._see_size, with_kwargs=True)

    def _refuse(self, ctx, size):
        """Combinations that read a map over the token grid where this control merges."""
        levels = len(ctx.unet.config.block_out_channels)
        sites = ctx.unet.attention_sites()

        def merged(name) -> bool:
            h, w = sites[name].site.grid(*size, levels)
            return self.merges(size, h * w)

        for c in ctx.controls:
            if isinstance(c, SAG) and c.scale > 0 and self.merge_attn and SAG_SITE in sites and merged(SAG_SITE):
                raise ValueError(f"controls: ToMe merges the mid block's self-attention tokens "
                                 f"(max_downsample={self.max_downsample}), whose map SAG reads over the "
                                 f"token grid; lower max_downsample or set merge_attn=False")
            if isinstance(c, AttendAndExcite) and self.merge_crossattn:
                read = [n for n in AttendAndExcite._pick_sites(ctx, c._resolution(ctx)) if merged(n)]
                if read:
                    raise ValueError(f"controls: ToMe's merge_crossattn merges the cross-attention tokens whose "
                                     f"maps Attend-and-Excite reads ({read[0]}); set merge_crossattn=False or "
                                     f"lower max_downsample")

    def teardown(self, ctx):
        for b in self._blocks:
            if b.token_merge is self:
                b.token_merge = None
        if self._hook is not None:
            self._hook.remove()
        self._blocks, self._hook, self._gen, self._call, self._draws = [], None, None, None, []

    def prepare_call(self, ctx, step, call):
        self._call, self._draws = call, []

    def _see_size(self, module, args, kwargs):
        """tomesd's pre-hook: the latent size of this UNet call (a view's, in MultiDiffusion)."""
        sample = args[0] if args else kwargs["sample"]
        self._size = (sample.shape[2], sample.shape[3])
        self._k = 0

    def __call__(self, x: torch.Tensor):
        """The blocks' ``token_merge`` hook: (merge, unmerge) for attn1, attn2 and ff."""
        n = x.shape[1]
        if not self.merges(self._size, n):
            return NO_MERGE
        down = downsample(self._size, n)
        h, w = math.ceil(self._size[0] / down), math.ceil(self._size[1] / down)
        # a call the loop evaluates in parts (memory budget) merges as it would in one:
        # its whole batch decides the parity rule, and later parts reuse the first's draws
        call = self._call if self._call is not None and self._call.window is not None else None
        rand = self._gen if (x.shape[0] if call is None else call.x.shape[0]) % 2 == 0 else None
        pick = None
        if rand is not None and call is not None:
            if call.window.start == 0:
                self._draws.append(draw_pick(h, w, self.sx, self.sy, rand))
            pick = self._draws[self._k]
            self._k += 1
        pair = bipartite_merge(x, h, w, self.sx, self.sy, int(n * self.ratio), rand, pick)
        return tuple(pair if on else (keep, keep) for on in (self.merge_attn, self.merge_crossattn, self.merge_mlp))
