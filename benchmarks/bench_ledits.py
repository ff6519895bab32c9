"""LEDITS++ vs diffusers' LEditsPPPipelineStableDiffusion(XL): the DDPM inversion, then the edit.

    python benchmarks/bench_ledits.py                                # CPU, SD1.5 layout, narrow channels
    python benchmarks/bench_ledits.py --model sd15 --device cuda --size 512 --steps 50
    python benchmarks/bench_ledits.py --model sdxl --device cuda --size 1024 --steps 50

Same weights (models.build), image, SDE-DPM-Solver++ schedule (the reference's default),
skip 0.15, no source prompt, two editing concepts with the reference's default masks
(intersection on SD, magnitude on SDXL; SDXL's reference is given negative_prompt="", the
base ours uses). The implementations alternate in one process, best of --repeats after a
warm-up. Wall time, UNet evaluations per step, peak memory growth (resident set on CPU,
allocated memory on CUDA) and the largest difference of the noise maps / edited latents.
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

from controldiff.controls.ledits import LEdits  # noqa: E402
from controldiff.controls.sega import Concept  # noqa: E402

EDITS = ["a straw hat", "sunglasses"]


def reference(base, sdxl: bool):
    import diffusers

    sched = diffusers.DPMSolverMultistepScheduler.from_config(base.scheduler.config, algorithm_type="sde-dpmsolver++",
                                                              solver_order=2)
    if sdxl:
        pipe = diffusers.LEditsPPPipelineStableDiffusionXL(
            vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
            tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=sched, add_watermarker=False)
    else:
        pipe = diffusers.LEditsPPPipelineStableDiffusion(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    options(ap, model="sd15-small", size=256, steps=10, repeats=2, help={"steps": "inversion steps (after skip)"})
    ap.add_argument("--skip", type=float, default=0.15)
    a = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    base, ours = build(a.model, device=a.device, dtype=getattr(torch, a.dtype))
    ours.progress = False
    sdxl = ours.info.family == "sdxl"
    ref = reference(base, sdxl)
    image = photo(a.size)
    neg = dict(negative_prompt="") if sdxl else {}
    concepts = [Concept(p, warmup=0) for p in EDITS]
    holder = {}

    def ref_invert():
        ref.invert(image, num_inversion_steps=a.steps, skip=a.skip, generator=torch.Generator().manual_seed(0), **neg)
        return ref.zs.transpose(0, 1)

    def ours_invert():
        holder["inv"] = ours.invert(image, method="ddpm", num_inference_steps=a.steps, skip=a.skip,
                                    scheduler="dpmpp_2m_sde", seed=0)
        return holder["inv"].noise

    def ref_edit():
        return ref(editing_prompt=EDITS, output_type="latent", **neg).images

    def ours_edit():
        return ours("", inversion=holder["inv"], guidance_scale=1.0, output_type="latent",
                    controls=[LEdits(concepts)]).images

    rows = {}
    for stage, fns in (("invert", (("ref", ref_invert, ref.unet), ("ours", ours_invert, ours.unet))),
                       ("edit", (("ref", ref_edit, ref.unet), ("ours", ours_edit, ours.unet)))):
        best, outs = {}, {}
        for r in range(a.repeats + 1):  # round 0 warms up
            for impl, fn, unet in fns:
                out, seconds, calls, peak, _ = measure(fn, unet, a.device)
                outs[impl] = out
                if r:
                    old = best.get(impl)
                    best[impl] = (min(seconds, old[0]) if old else seconds, calls,
                                  min(peak, old[2]) if old else peak)
        rows[stage] = best, float((outs["ours"].float() - outs["ref"].float()).abs().max())
    print(f"\n{a.model}, {a.size}x{a.size}, {a.device} {a.dtype}, {a.steps} steps (skip {a.skip}), "
          f"{len(EDITS)} concepts, best of {a.repeats}")
    print("| stage | ours s | diffusers s | time ratio | UNet calls per step ours / ref | peak MB ours / ref "
          "| max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for stage, (best, diff) in rows.items():
        o, d = best["ours"], best["ref"]
        print(f"| {stage} | {o[0]:.2f} | {d[0]:.2f} | **{o[0] / d[0]:.2f}** | {o[1] / a.steps:.0f} / "
              f"{d[1] / a.steps:.0f} | {o[2]:.0f} / {d[2]:.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
