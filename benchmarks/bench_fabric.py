"""FABRIC vs diffusers' community FabricPipeline (vendored in tests/reference).

    python benchmarks/bench_fabric.py                          # CPU, SD1.5 layout with narrow channels
    python benchmarks/bench_fabric.py --model sd15 --device cuda --dtype float16

Same weights, prompt, seed, feedback images and scheduler (the model's PNDM) in both; the
two alternate in one process (best of --repeats after a warm-up round). Prints wall time
and the process's CPU time (on a shared machine the steadier of the two),
UNet evaluations per step (main and feedback passes), peak memory growth (resident set on
the CPU, allocated memory on CUDA) and, for CPU float32, the largest difference between
the two images (the reference's global-RNG noise routed through the generator, as in the
parity tests).
"""
from __future__ import annotations

import argparse
import functools
import inspect
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench import measure, options  # noqa: E402
from models import build  # noqa: E402

from controldiff.controls.fabric import FABRIC  # noqa: E402


def feedback_images(size: int, n: int) -> list:
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)) for _ in range(n)]


def routed(ref, generator):
    """The reference's torch.randn_like and ancestral step noise drawn from ``generator``."""
    original_randn, original_step = torch.randn_like, ref.scheduler.step
    torch.randn_like = lambda t, **_: torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
    if "generator" in inspect.signature(original_step).parameters:
        ref.scheduler.step = functools.partial(original_step, generator=generator)

    def restore():
        torch.randn_like = original_randn
        ref.scheduler.__dict__.pop("step", None)
    return restore


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    options(p, model="sd15-small", size=256, steps=6, repeats=2)
    p.add_argument("--liked", type=int, default=2)
    p.add_argument("--disliked", type=int, default=1)
    p.add_argument("--images", type=int, default=1, help="images per prompt")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    from reference.pipeline_fabric import FabricPipeline

    dtype = getattr(torch, a.dtype)
    sd, ours = build(a.model, device=a.device, dtype=dtype)
    ours.progress = False
    ref = FabricPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                         scheduler=sd.scheduler)
    ref.set_progress_bar_config(disable=True)
    images = feedback_images(a.size, a.liked + a.disliked)
    liked, disliked = images[:a.liked], images[a.liked:]
    common = dict(negative_prompt="blurry", height=a.size, width=a.size, num_inference_steps=a.steps,
                  guidance_scale=7.0, output_type="np")

    def run_ref():
        g = torch.Generator().manual_seed(0)
        restore = routed(ref, g)
        try:
            return ref("a photo of a cat", generator=g, liked=liked, disliked=disliked, num_images=a.images,
                       **common).images
        finally:
            restore()

    def run_ours():
        return ours("a photo of a cat", generator=torch.Generator().manual_seed(0), scheduler="pndm",
                    num_images_per_prompt=a.images, controls=[FABRIC(liked, disliked)], **common).images

    best = {}
    outs = {}
    for r in range(a.repeats + 1):  # round 0 warms up
        for key, fn, unet in (("reference", run_ref, ref.unet), ("ours", run_ours, ours.unet)):
            out, seconds, calls, peak, cpu = measure(fn, unet, a.device)
            outs[key] = out
            if r:
                old = best.get(key, (float("inf"), float("inf"), calls, 0.0))
                best[key] = (min(old[0], seconds), min(old[1], cpu), calls, max(old[3], peak))
    diff = (float(np.abs(outs["ours"] - outs["reference"]).max())
            if a.device == "cpu" and a.dtype == "float32" else None)
    timesteps = a.steps + 1  # PNDM (skip_prk_steps) runs steps + 1 timesteps
    o, r = best["ours"], best["reference"]
    print(f"\nFABRIC, {a.model}, {a.size}x{a.size}, {a.steps} steps (pndm), {a.liked} liked + {a.disliked} disliked, "
          f"{a.images} image(s), CFG 7.0, {a.device} {a.dtype}")
    print("| | ours | reference | ratio |")
    print("|---|---|---|---|")
    print(f"| wall time (s) | {o[0]:.2f} | {r[0]:.2f} | **{o[0] / r[0]:.2f}** |")
    print(f"| CPU time of the process (s) | {o[1]:.2f} | {r[1]:.2f} | **{o[1] / r[1]:.2f}** |")
    print(f"| UNet evaluations per timestep | {o[2] / timesteps:.1f} | {r[2] / timesteps:.1f} | |")
    print(f"| peak memory growth (MiB) | {o[3]:.0f} | {r[3]:.0f} | {o[3] / max(r[3], 1e-9):.2f} |")
    if diff is not None:
        print(f"| max abs image difference | {diff:.1e} | | |")


if __name__ == "__main__":
    main()
