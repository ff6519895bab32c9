"""DiffEdit vs diffusers' StableDiffusionDiffEditPipeline: mask, inversion and edit.

    python benchmarks/bench_diffedit.py                                   # CPU, SD1.5 layout, narrow channels
    python benchmarks/bench_diffedit.py --model sd15 --device cuda --size 512 --steps 50

Same weights (models.build), image, prompts and seeds; DDIM (and DDIM inversion) in both.
The two implementations alternate in one process, best of --repeats after a warm-up.
Per phase: wall time, UNet evaluations (batched calls), peak memory growth (resident set
on CPU, allocated memory on CUDA), and the largest difference of the results.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench import measure, options, photo  # noqa: E402
from models import build  # noqa: E402

from controldiff.controls.diffedit import DiffEdit  # noqa: E402

SOURCE, TARGET = "a bowl of fruits", "a bowl of pears"


def reference(ref):
    import diffusers

    ddim = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    pipe = diffusers.StableDiffusionDiffEditPipeline(
        vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet, scheduler=ddim,
        inverse_scheduler=diffusers.DDIMInverseScheduler.from_config(ddim.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    options(ap, model="sd15-small", size=256, steps=10, repeats=2)
    ap.add_argument("--strength", type=float, default=0.8, help="inpaint_strength")
    ap.add_argument("--maps", type=int, default=10, help="num_maps_per_mask")
    a = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    base, ours = build(a.model, device=a.device, dtype=getattr(torch, a.dtype))
    ours.progress = False
    ref = reference(base)
    image, steps = photo(a.size), a.steps
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731

    ref_phases = {
        "mask": lambda: torch.from_numpy(ref.generate_mask(image=image, source_prompt=SOURCE, target_prompt=TARGET,
                                                           num_maps_per_mask=a.maps, num_inference_steps=steps,
                                                           generator=g(1))).float(),
        "invert": lambda: ref.invert(prompt=SOURCE, image=image, num_inference_steps=steps,
                                     inpaint_strength=a.strength, guidance_scale=1.0, generator=g(2)).latents,
        "edit": lambda: ref(prompt=TARGET, mask_image=state["ref_mask"].numpy(), image_latents=state["ref_inv"],
                            inpaint_strength=a.strength, num_inference_steps=steps, output_type="np").images,
    }
    our_phases = {
        "mask": lambda: ours.diffedit_mask(image, SOURCE, TARGET, num_maps_per_mask=a.maps, num_inference_steps=steps,
                                           seed=1),
        "invert": lambda: ours.invert(image, SOURCE, num_inference_steps=steps, strength=a.strength, seed=2),
        "edit": lambda: ours(TARGET, inversion=state["inv"], controls=[DiffEdit(state["mask"], state["inv"])],
                             output_type="np").images,
    }
    state: dict = {}
    best = {}
    outs = {}
    for r in range(a.repeats + 1):  # round 0 warms up
        for phase in ("mask", "invert", "edit"):
            for impl, fn, unet in (("ref", ref_phases[phase], ref.unet), ("ours", our_phases[phase], ours.unet)):
                out, seconds, calls, peak, _ = measure(fn, unet, a.device)
                outs[impl, phase] = out
                if r:
                    old = best.get((impl, phase))
                    best[impl, phase] = (min(seconds, old[0]) if old else seconds, calls,
                                         min(peak, old[2]) if old else peak)
            if phase == "mask":
                state.update(ref_mask=outs["ref", "mask"], mask=outs["ours", "mask"])
            if phase == "invert":
                state.update(ref_inv=outs["ref", "invert"], inv=outs["ours", "invert"])

    diffs = {"mask": (outs["ours", "mask"] - outs["ref", "mask"]).abs().max().item(),
             "invert": (outs["ours", "invert"].trajectory - outs["ref", "invert"]).abs().max().item(),
             "edit": float(np.abs(outs["ours", "edit"] - outs["ref", "edit"]).max())}
    run_steps = {"mask": 1, "invert": int(steps * a.strength), "edit": int(steps * a.strength)}
    print(f"\n{a.model}, {a.size}x{a.size}, {a.device} {a.dtype}, {steps} steps, inpaint_strength {a.strength}, "
          f"num_maps_per_mask {a.maps}, CFG 7.5 (inversion 1.0), best of {a.repeats}")
    print("| phase | ours s | diffusers s | time ratio | UNet calls ours / ref | peak MB ours / ref | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for phase in ("mask", "invert", "edit"):
        o, d = best["ours", phase], best["ref", phase]
        n = run_steps[phase]
        print(f"| {phase} | {o[0]:.2f} | {d[0]:.2f} | **{o[0] / d[0]:.2f}** | {o[1]} / {d[1]} ({o[1] / n:.0f} / "
              f"{d[1] / n:.0f} per step) | {o[2]:.0f} / {d[2]:.0f} | {diffs[phase]:.1e} |")


if __name__ == "__main__":
    main()
