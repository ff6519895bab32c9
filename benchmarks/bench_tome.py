"""ToMe vs ``tomesd.apply_patch`` on diffusers, and what merging saves each of them.

    python benchmarks/bench_tome.py                              # CPU, one thread, sd15-small, 512x512
    python benchmarks/bench_tome.py --model sd15 --device cuda --dtype float16 --steps 20

Same random weights (SD1.5's layout), prompt, seed, DDIM steps and CFG 7.5 in all four
runs: diffusers, diffusers under tomesd, ours, ours with ``ToMe`` (same ratio, tomesd's
other defaults; tomesd's generator forked from ``torch.manual_seed(seed)``, ours
``ToMe(seed=seed)``). ToMe pays off with many tokens: 512x512 has 4096 at the top level.
Prints wall and CPU time (best of --repeats after a warm-up round, the four alternating),
peak memory growth, and for CPU float32 the largest difference between the final latents.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench import measure, options  # noqa: E402
from models import build  # noqa: E402

from controldiff.controls.tome import ToMe  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    options(p, model="sd15-small", size=512, steps=2, repeats=1, help={"repeats": "0: one round, no warm-up"})
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import diffusers
    import tomesd

    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    dtype = getattr(torch, a.dtype)
    ref, ours = build(a.model, device=a.device, dtype=dtype)
    ours.progress = False
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    # latents out: merging changes the UNet only, the VAE decode would be the same work in all four
    common = dict(height=a.size, width=a.size, num_inference_steps=a.steps, guidance_scale=7.5, output_type="latent")
    prompt, seed = "a photo of a cat", 0

    def run_ref(merge: bool):
        def go():
            if merge:
                tomesd.apply_patch(ref, ratio=a.ratio)
                torch.manual_seed(seed)
            try:
                return ref(prompt, generator=torch.Generator().manual_seed(seed), **common).images
            finally:
                tomesd.remove_patch(ref)
        return go

    def run_ours(merge: bool):
        controls = [ToMe(ratio=a.ratio, seed=seed)] if merge else []
        return lambda: ours(prompt, generator=torch.Generator().manual_seed(seed), scheduler="ddim",
                            controls=controls, **common).images

    runs = {("diffusers", False): (run_ref(False), ref.unet), ("diffusers", True): (run_ref(True), ref.unet),
            ("ours", False): (run_ours(False), ours.unet), ("ours", True): (run_ours(True), ours.unet)}
    best, outs = {}, {}
    for r in range(a.repeats + 1 if a.repeats else 1):  # round 0 warms up, unless it is the only one
        for key, (fn, unet) in runs.items():
            run = measure(fn, unet, a.device)
            outs[key] = run.out
            if r or not a.repeats:
                old = best.get(key, (float("inf"), float("inf"), 0.0))
                best[key] = (min(old[0], run.seconds), min(old[1], run.cpu), max(old[2], run.peak_mb))
    exact = a.device == "cpu" and a.dtype == "float32"
    print(f"\nToMe ratio {a.ratio}, {a.model}, {a.size}x{a.size}, {a.steps} DDIM steps, CFG 7.5, latents out, "
          f"{a.device} {a.dtype}, {a.threads} thread(s), best of {max(a.repeats, 1)}")
    print("| | diffusers | + tomesd | ours | + ToMe | ToMe / tomesd |")
    print("|---|---|---|---|---|---|")
    for i, label in enumerate(("wall time (s)", "CPU time of the process (s)", "peak memory growth (MiB)")):
        d, dt, o, ot = (best[k][i] for k in (("diffusers", False), ("diffusers", True), ("ours", False), ("ours", True)))
        fmt = "{:.0f}" if i == 2 else "{:.2f}"
        cells = " | ".join(fmt.format(v) for v in (d, dt, o, ot))
        print(f"| {label} | {cells} | **{ot / max(dt, 1e-9):.2f}** |")
        if i < 2:
            print(f"| {label}: merged / unmerged | | {dt / d:.2f} | | {ot / o:.2f} | |")
    if exact:
        def diff(x, y):
            return float((outs[x] - outs[y]).abs().max())
        merged = diff(("ours", True), ("diffusers", True))
        plain = diff(("ours", False), ("diffusers", False))
        effect = diff(("ours", True), ("ours", False))
        print(f"| max abs latent difference ours vs reference | {plain:.1e} | {merged:.1e} | | | |")
        print(f"| max abs change ToMe makes (ours) | | | | {effect:.1e} | |")


if __name__ == "__main__":
    main()
