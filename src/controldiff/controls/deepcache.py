"""DeepCache (Ma et al. 2023): reuse the UNet's deep features between steps, as the
``DeepCache`` package's ``DeepCacheSDHelper``.

A full step runs the whole UNet and keeps the up path's input at one skip branch; the
next ``cache_interval - 1`` steps run only the shallow part (the down path to that skip,
then the up path from it) with the kept features standing for the rest. Branch ids are
the reference's: level ``cache_branch_id // 3`` (0 = the finest), skip
``cache_branch_id % 3`` of it (0 = its input; the deeper the branch, the more each cached
step runs).

The schedule is per sampling step (one batched call holds every branch: CFG, SEGA
concepts, PAG), counted as the reference counts UNet calls: by the position of the step's
timestep in the run's schedule, so Heun-like schedulers, which evaluate a timestep twice,
give both evaluations the decision of its first (as the reference does). Every call of a
step keeps its own features (MultiDiffusion's view groups), each part of a call the loop
splits by its memory budget too; a call whose branches or
views differ from those of its last full step runs in full. ControlNet and T2I-Adapter
residuals act on the skips that run (the deep ones are in the cached features, as with
the reference on diffusers' ControlNet pipeline). Re-runs through ``ctx.run_unet`` (SAG,
CLIP guidance) run in full and leave the cache alone.
"""
from __future__ import annotations

from ..models.unet import SkipCache
from ..sampling.control import Control

SKIPS_PER_LEVEL = 3   # the reference's numbering: SD and SDXL levels have two layers (three skips)


class PartCaches:
    """One call's features: a SkipCache per part of its rows the loop evaluates (the memory
    budget may split a call; see ``ModelCall.window``). Outside the evaluation (re-runs that
    copy the call's arguments, as SAG's) ``rows_of`` gives None: they run in full."""

    def __init__(self, level: int, layer: int):
        self.level, self.layer = level, layer
        self.parts: dict[tuple[int, int], SkipCache] = {}
        self.call = None

    def rows_of(self, rows: slice):
        if self.call is None or self.call.window is None:
            return None
        key = (rows.start, rows.stop)
        if key not in self.parts:
            self.parts[key] = SkipCache(self.level, self.layer)
        return self.parts[key]


class DeepCache(Control):
    def __init__(self, cache_interval: int = 3, cache_branch_id: int = 0, skip_mode: str = "uniform"):
        for name, v, low in (("cache_interval", cache_interval, 1), ("cache_branch_id", cache_branch_id, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {v!r}")
        if skip_mode != "uniform":
            raise ValueError(f"skip_mode: expected 'uniform' (the only mode of the reference), got {skip_mode!r}")
        self.cache_interval = cache_interval
        self.cache_branch_id = cache_branch_id
        self.skip_mode = skip_mode
        self._caches: list[PartCaches] = []   # one per call of a step (MultiDiffusion's view groups)
        self._layouts: list = []               # each call's branches and views at its last full step
        self._calls = 0

    def setup(self, ctx):
        blocks = ctx.unet.down_blocks
        level, layer = divmod(self.cache_branch_id, SKIPS_PER_LEVEL)
        if level >= len(blocks):
            raise ValueError(f"cache_branch_id: this UNet has skip branches 0..{SKIPS_PER_LEVEL * len(blocks) - 1} "
                             f"({len(blocks)} levels of {SKIPS_PER_LEVEL}), got {self.cache_branch_id}")
        if layer > len(blocks[level].resnets):
            raise ValueError(f"cache_branch_id: level {level} of this UNet has {len(blocks[level].resnets) + 1} "
                             f"skip branches, got {self.cache_branch_id} (skip {layer} of level {level})")
        self._level, self._layer = level, layer
        first = [int((ctx.timesteps == t).nonzero()[0]) for t in ctx.timesteps]  # the reference's step count
        self._full = [(p - first[0]) % self.cache_interval == 0 for p in first]
        self._reset()

    def teardown(self, ctx):
        self._reset()

    def _reset(self):
        self._caches, self._layouts, self._calls = [], [], 0

    def is_full(self, step) -> bool:
        """Whether ``step`` runs the whole UNet (and refreshes the cached features)."""
        return self._full[step.index]

    def before_step(self, ctx, step, latents):
        self._calls = 0
        return latents

    def prepare_call(self, ctx, step, call):
        k = self._calls
        self._calls += 1
        if k == len(self._caches):
            self._caches.append(PartCaches(self._level, self._layer))
            self._layouts.append(None)
        layout = (list(call.slices.items()), call.views, tuple(call.x.shape))
        caches = self._caches[k]
        caches.call = call
        if self.is_full(step) or layout != self._layouts[k]:
            caches.parts.clear()   # this call runs in full and records (the same parts, given the same shape)
            self._layouts[k] = layout
        for cache in caches.parts.values():
            cache.used = False
        call.kwargs["skip_cache"] = caches
