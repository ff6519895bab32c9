"""CLIP guidance vs diffusers' community CLIPGuidedStableDiffusion (tests/reference/).

    python benchmarks/bench_clip_guidance.py                  # CPU, SD1.5 layout with narrow channels
    python benchmarks/bench_clip_guidance.py --model sd15 --device cuda --size 512

Same weights (models.build), prompt, seed and scheduler; both seed torch's global generator
before each run (the reference draws its cutouts from it), so both make the same image (the
max abs difference is printed). The CLIP model is random, ViT-B/32-shaped. The reference is
timed as shipped (its UNet and VAE weights require grad, so its backward graph reaches them)
and with its ``freeze_unet()``/``freeze_vae()`` (ours never needs grad on weights). Time: after
one warm-up run each, the implementations alternate in one process, best of --repeats. Peak
memory on CPU: each implementation's first run in a fresh process (resident set growth; in a
shared process whoever runs first would pay for the pages the others reuse); on CUDA: max
allocated, in the timing process. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from bench import CountCalls, options, PeakRSS  # noqa: E402
from models import build  # noqa: E402

from controldiff import tiny  # noqa: E402
from controldiff.controls.clip_guidance import CLIP_MEAN, CLIP_STD, CLIPGuidance  # noqa: E402

PROMPT = "a photo of a cat"
DIFFUSERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
             "dpmpp_2m": "DPMSolverMultistepScheduler"}


def clip_b32(device, dtype):
    """A random CLIP ViT-B/32 (vision 224 px, patch 32, 12 layers; text 512 wide, 12 layers)."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(tiny.text_encoder_config(hidden_size=512, layers=12), vocab_size=49408, intermediate_size=2048,
                num_attention_heads=8)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=32, hidden_act="quick_gelu")
    torch.manual_seed(1)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).to(device, dtype).eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    options(p, model="sd15-small", size=256, steps=6, repeats=2)
    p.add_argument("--scheduler", default="ddim", choices=list(DIFFUSERS))
    p.add_argument("--scale", type=float, default=100.0)
    p.add_argument("--num-cutouts", type=int, default=4)
    p.add_argument("--memory-of", choices=["ours", "diffusers", "diffusers, frozen"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    import diffusers
    from transformers import CLIPImageProcessor

    from reference.clip_guided_stable_diffusion import CLIPGuidedStableDiffusion

    dtype = getattr(torch, a.dtype)
    base, ours = build(a.model, device=a.device, dtype=dtype)
    ours.progress = False
    clip = clip_b32(a.device, dtype)
    ref = CLIPGuidedStableDiffusion(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, clip_model=clip,
        scheduler=getattr(diffusers, DIFFUSERS[a.scheduler]).from_config(base.scheduler.config),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                             image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)))
    ref.set_progress_bar_config(disable=True)
    control = CLIPGuidance(clip, scale=a.scale, num_cutouts=a.num_cutouts)
    kw = dict(height=a.size, width=a.size, num_inference_steps=a.steps, guidance_scale=7.5, output_type="np")
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run_ours():
        return ours(PROMPT, generator=torch.Generator().manual_seed(0), scheduler=a.scheduler, controls=[control],
                    **kw).images

    def run_ref(frozen):
        def go():
            for m in (ref.unet, ref.vae):
                m.requires_grad_(not frozen)
            return ref(PROMPT, generator=torch.Generator().manual_seed(0), clip_guidance_scale=a.scale,
                       num_cutouts=a.num_cutouts, use_cutouts=True, **kw).images
        return go

    impls = {"ours": (run_ours, ours.unet), "diffusers": (run_ref(False), ref.unet),
             "diffusers, frozen": (run_ref(True), ref.unet)}
    if a.memory_of is not None:   # a fresh process: the peak of one cold run
        torch.manual_seed(0)
        with PeakRSS() as rss:
            impls[a.memory_of][0]()
        print(json.dumps({"peak_mb": (rss.peak - rss.base) / 2**20}))
        return
    for fn, _ in impls.values():
        fn()   # warm-up
    seconds = {name: float("inf") for name in impls}
    calls, images, peak = {}, {}, {}
    for _ in range(a.repeats):
        for name, (fn, unet) in impls.items():
            counter = CountCalls(unet)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                start_mem = torch.cuda.memory_allocated()
            torch.manual_seed(0)
            sync()
            t0 = time.perf_counter()
            images[name] = fn()
            sync()
            seconds[name] = min(seconds[name], time.perf_counter() - t0)
            counter.handle.remove()
            calls[name] = counter.n / a.steps
            if cuda:
                peak[name] = max(peak.get(name, 0.0), (torch.cuda.max_memory_allocated() - start_mem) / 2**20)
    if not cuda:
        argv = list(argv if argv is not None else sys.argv[1:])
        for name in impls:
            out = subprocess.run([sys.executable, __file__, *argv, "--memory-of", name], check=True,
                                 capture_output=True, text=True).stdout
            peak[name] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
    diff = float(np.abs(images["ours"] - images["diffusers"]).max())
    o = seconds["ours"]
    print(f"{a.model}, {a.size}px, {a.steps} {a.scheduler} steps, CFG 7.5, {a.num_cutouts} cutouts, scale {a.scale:g}, "
          f"{a.device} {a.dtype}, {torch.get_num_threads()} threads; max abs image difference ours vs diffusers "
          f"{diff:.1e}\n")
    print("| implementation | s / image | time ratio ours / this | UNet calls / step | peak MB |")
    print("|---|---|---|---|---|")
    for name in impls:
        print(f"| {name} | {seconds[name]:.2f} | {o / seconds[name]:.2f} | {calls[name]:g} | {peak[name]:.0f} |")


if __name__ == "__main__":
    main()
