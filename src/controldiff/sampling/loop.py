"""THE sampling loop: one loop for every control, every model family.

Each step: gather the branches all controls need, evaluate them in one batched UNet
call (run in as many parts as fit the memory budget, with the same result), let the controls combine the predictions, step the scheduler, and run the
latent operators. A control may split the canvas into views (MultiDiffusion); then
the same evaluate-combine-step runs on the stacked crops. Nothing here knows about a
particular control.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..precision import LATENT_DTYPE
from ..text.encode import TextCond
from ..memory import plan_rows, unet_row_bytes
from .control import Branch, Context, Control, ModelCall, Step, crop_views, rows_of
from .finite import StepWatch


def _gather_branches(controls: Sequence[Control], ctx: Context, step: Step) -> list[Branch]:
    seen: dict[str, Branch] = {}
    for control in controls:
        for b in control.branches(ctx, step):
            seen.setdefault(b.name, b)  # two controls asking for the same branch share it
    if not seen:
        raise ValueError("controls: no control asked for a model evaluation")
    return list(seen.values())


def build_call(ctx: Context, step: Step, latents: torch.Tensor, branches: list[Branch],
               views: Optional[list] = None) -> ModelCall:
    """Stack every branch (and every view) into one UNet input."""
    n, v = len(branches), (1 if views is None else len(views))
    x = torch.cat([latents] * n) if n > 1 else latents
    x = ctx.scheduler.scale_model_input(x, step.t)
    concats = [b.concat if b.concat is not None else ctx.concat for b in branches]
    if concats[0] is not None:
        x = torch.cat([x, torch.cat([crop_views(c, views) for c in concats])], dim=1)
    x = x.to(ctx.dtype)   # the latents are float32 (see sample); only the UNet runs in its dtype
    text = TextCond.cat([b.text for b in branches])
    rows = ctx.batch * v
    slices = {b.name: slice(i * rows, (i + 1) * rows) for i, b in enumerate(branches)}
    embeds = text.embeds if v == 1 else torch.cat([b.text.pad_to(text.length).embeds.repeat(v, 1, 1) for b in branches])
    call = ModelCall(x=x, t=step.t, embeds=embeds, branches=branches, slices=slices, views=views)
    if text.pooled is not None:
        pooled = torch.cat([b.text.pooled.repeat(v, 1) for b in branches])
        time_ids = torch.cat([(b.time_ids if b.time_ids is not None else ctx.time_ids).repeat(v, 1) for b in branches])
        call.kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return call


def row_bytes(ctx: Context, height: int, width: int) -> int:
    """Estimated bytes one batch row of a UNet call at ``height`` x ``width`` latents needs."""
    return unet_row_bytes(ctx.unet.config, height, width, ctx.dtype.itemsize)


def evaluate(ctx: Context, call: ModelCall) -> dict[str, torch.Tensor]:
    """Run the UNet on the batched call and split the prediction by branch.

    The rows are evaluated in as many parts as fit ``ctx.memory_budget`` (one when it
    allows): every tensor argument is cut to the part's rows (``rows_of``), processors see
    the part through ``call.window`` / ``call.local``, and the parts' outputs are stacked
    again, so controls see the predictions one call would give.
    """
    h, w = call.x.shape[-2:]
    parts = plan_rows(call.x.shape[0], row_bytes(ctx, h, w), ctx.memory_budget, f"UNet call at {h}x{w} latents")
    scope = ctx.unet.attention_processors(call.processors) if call.processors else contextlib.nullcontext()
    outs = []
    with scope:
        for rows in parts:
            call.window = rows
            try:
                t = call.t if not torch.is_tensor(call.t) or call.t.ndim == 0 else call.t[rows]
                outs.append(ctx.unet(call.x[rows], t, call.embeds[rows], **rows_of(call.kwargs, rows)))
            finally:
                call.window = None
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return {name: out[s] for name, s in call.slices.items()}


def _views_owner(controls: Sequence[Control]) -> Optional[Control]:
    owners = [c for c in controls if type(c).step_views is not Control.step_views]
    if len(owners) > 1:
        names = ", ".join(type(c).__name__ for c in owners)
        raise ValueError(f"controls: only one control may split the canvas into views, got {names}")
    return owners[0] if owners else None


def sample(
    ctx: Context,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    controls: Sequence[Control],
    *,
    callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], Optional[bool]]] = None,
    progress: bool = True,
    step_kwargs: Optional[dict] = None,
) -> tuple[torch.Tensor, int]:
    """Denoise ``latents`` over ``timesteps``; return (latents, steps done).

    ``callback(i, t, latents)`` runs after each step; returning False stops the loop
    early (the latents reached so far are returned, nothing is lost). Latents that turn
    NaN or infinite raise a FloatingPointError naming the first such step (on the CPU at
    that step, on an accelerator after the loop: see :class:`StepWatch`). The latents,
    guidance and scheduler arithmetic stay float32 when the UNet runs in float16/bfloat16
    (as diffusers' schedulers upcast inside a step, but without rounding between steps).
    """
    latents = latents.to(LATENT_DTYPE)
    step_kwargs = step_kwargs or {}
    ctx.step_kwargs = step_kwargs   # for controls that step a scheduler copy (Pix2PixZero's reference pass)
    owner = _views_owner(controls)
    count = len(timesteps)
    done = 0
    watch = StepWatch(timesteps, ctx.dtype)
    offset = ctx.scheduler.begin_index or 0   # img2img: timesteps start part-way into the schedule
    kind = ctx.scheduler.config.prediction_type
    with tqdm(total=count, disable=not progress, desc="sampling", leave=False) as bar:
        for i, t in enumerate(timesteps):
            alpha, sigma = ctx.scheduler.noise_level(offset + i)
            step = Step(index=i, t=t, count=count, alpha=alpha, sigma=sigma, prediction_type=kind)
            for c in controls:
                latents = c.before_step(ctx, step, latents)

            def denoise(x: torch.Tensor, views: Optional[list] = None) -> torch.Tensor:
                branches = _gather_branches(controls, ctx, step)
                call = build_call(ctx, step, x, branches, views)
                for c in controls:
                    c.prepare_call(ctx, step, call)
                preds = {k: v.to(x.dtype) for k, v in evaluate(ctx, call).items()}  # guidance, scheduler: float32
                step.call = call
                pred = preds["cond"] if "cond" in preds else preds[branches[-1].name]
                for c in controls:
                    pred = c.combine(ctx, step, preds, pred)
                return ctx.scheduler.step(pred, t, x, generator=ctx.generator, **step_kwargs)

            latents = denoise(latents) if owner is None else owner.step_views(ctx, step, latents, denoise)
            for c in controls:
                latents = c.after_step(ctx, step, latents)
            watch.see(i, latents)
            done = i + 1
            bar.update()
            if callback is not None and callback(i, t, latents) is False:
                break
    watch.check()
    return latents, done
