"""Pix2Pix-Zero vs diffusers' StableDiffusionPix2PixZeroPipeline: the edit from an inversion.

    python benchmarks/bench_pix2pix_zero.py                               # CPU, SD1.5 layout, narrow channels
    python benchmarks/bench_pix2pix_zero.py --model sd15 --device cuda --size 512 --steps 50

Same weights (models.build), inverted latents (ours, shared: the inversion itself is
benchmarked with DiffEdit's), caption, source/target prompts and DDIM schedule. The
reference runs its two passes (all steps' cross-attention maps kept on the CPU between
them); ours runs both in lockstep. The implementations alternate in one process, best of
--repeats after a warm-up. Wall time (and CPU time: a wall time far above CPU time / threads means
the machine was busy), UNet evaluations per step, peak memory growth
(resident set on CPU, allocated memory on CUDA) and the largest difference of the results.
The reference accumulates weight gradients in the UNet's parameters and never frees
them: they are dropped before each of its runs, so each measures one call's cost.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench import measure, options, photo  # noqa: E402
from models import build  # noqa: E402

from controldiff.controls.pix2pix_zero import Pix2PixZero  # noqa: E402

CAPTION = "a photograph of a cat sitting on the grass"
SOURCE = ["a cat sitting on the street", "a cat playing in the field", "a face of a cat"]
TARGET = ["a dog sitting on the street", "a dog playing in the field", "a face of a dog"]


def reference(base):
    import diffusers

    ddim = diffusers.DDIMScheduler.from_config(base.scheduler.config)
    pipe = diffusers.StableDiffusionPix2PixZeroPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, scheduler=ddim,
        inverse_scheduler=diffusers.DDIMInverseScheduler.from_config(ddim.config), safety_checker=None,
        feature_extractor=None, caption_generator=None, caption_processor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    options(ap, model="sd15-small", size=256, steps=10, repeats=2)
    ap.add_argument("--amount", type=float, default=0.1, help="cross_attention_guidance_amount")
    ap.add_argument("--guidance", type=float, default=7.5)
    a = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    base, ours = build(a.model, device=a.device, dtype=getattr(torch, a.dtype))
    ours.progress = False
    ref = reference(base)
    inv = ours.invert(photo(a.size), CAPTION, num_inference_steps=a.steps, seed=0)
    source, target = ref.get_embeds(SOURCE), ref.get_embeds(TARGET)

    def run_ref():
        for p in ref.unet.parameters():
            p.grad = None
        return ref(CAPTION, source_embeds=source, target_embeds=target, latents=inv.latents.clone(),
                   num_inference_steps=a.steps, guidance_scale=a.guidance, output_type="latent",
                   cross_attention_guidance_amount=a.amount).images

    def run_ours():
        return ours(CAPTION, inversion=inv, guidance_scale=a.guidance, output_type="latent",
                    controls=[Pix2PixZero(SOURCE, TARGET, a.amount)]).images

    best, outs = {}, {}
    for r in range(a.repeats + 1):  # round 0 warms up
        for impl, fn, unet in (("ref", run_ref, ref.unet), ("ours", run_ours, ours.unet)):
            out, seconds, calls, peak, cpu = measure(fn, unet, a.device)
            outs[impl] = out
            if r:
                old = best.get(impl)
                best[impl] = (min(seconds, old[0]) if old else seconds, calls, min(peak, old[2]) if old else peak,
                              min(cpu, old[3]) if old else cpu)
    diff = float((outs["ours"].float() - outs["ref"].float()).abs().max())
    # the same comparison without the edit: the two pipelines' own float32 difference at this size
    plain_ref = ref(CAPTION, source_embeds=source, target_embeds=source, latents=inv.latents.clone(),
                    num_inference_steps=a.steps, guidance_scale=a.guidance, output_type="latent",
                    cross_attention_guidance_amount=0.0).images
    plain = ours(CAPTION, inversion=inv, guidance_scale=a.guidance, output_type="latent").images
    baseline = float((plain.float() - plain_ref.float()).abs().max())
    o, d = best["ours"], best["ref"]
    print(f"\n{a.model}, {a.size}x{a.size}, {a.device} {a.dtype}, {a.steps} steps, "
          f"cross_attention_guidance_amount {a.amount}, CFG {a.guidance}, best of {a.repeats}")
    print("| ours s (CPU s) | diffusers s (CPU s) | time ratio | UNet calls per step ours / ref | peak MB ours / ref | max abs diff "
          "| same without the edit |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {o[0]:.2f} ({o[3]:.1f}) | {d[0]:.2f} ({d[3]:.1f}) | **{o[0] / d[0]:.2f}** | {o[1] / a.steps:.0f} / {d[1] / a.steps:.0f} | "
          f"{o[2]:.0f} / {d[2]:.0f} | {diff:.1e} | {baseline:.1e} |")


if __name__ == "__main__":
    main()
