"""DeepCache: cd.DeepCache vs the DeepCache package's DeepCacheSDHelper on diffusers.

    python benchmarks/bench_deepcache.py                        # CPU, SD1.5 architecture, 256x256 (~4 min)
    python benchmarks/bench_deepcache.py --device cuda --dtype float16 --size 512 --steps 25

Same random weights, prompt, seed and scheduler (the model's PNDM) in both; each runs with
and without DeepCache, alternating in one process (best of --repeats after a one-step
warm-up of each pipeline). Prints wall and CPU time, the speed-up DeepCache gives each, UNet evaluations
(all, and full ones: those that ran the mid block), peak memory growth and, for CPU
float32, the largest difference between the two cached images.
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

from bench import CountCalls, measure, options  # noqa: E402
from models import build  # noqa: E402

import controldiff as cd  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    options(p, model="sd15", size=256, steps=8, repeats=1)
    p.add_argument("--cache-interval", type=int, default=3)
    p.add_argument("--cache-branch-id", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    from DeepCache import DeepCacheSDHelper

    ref, ours = build(a.model, device=a.device, dtype=getattr(torch, a.dtype))
    ours.progress = False
    ref.set_progress_bar_config(disable=True)
    helper = DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=a.cache_interval, cache_branch_id=a.cache_branch_id)
    common = dict(height=a.size, width=a.size, guidance_scale=7.5, output_type="np")

    def run_ref(cached: bool, steps: int):
        if cached:
            helper.enable()
        try:
            return ref("a photo of a cat", generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                       **common).images
        finally:
            if cached:
                helper.disable()

    def run_ours(cached: bool, steps: int):
        controls = [cd.DeepCache(a.cache_interval, a.cache_branch_id)] if cached else []
        return ours("a photo of a cat", generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                    scheduler="pndm", controls=controls, **common).images

    runs = {("ours", c): (run_ours, ours.unet) for c in (False, True)}
    runs.update({("reference", c): (run_ref, ref.unet) for c in (False, True)})
    for fn in (run_ours, run_ref):   # warm-up: one step each
        fn(False, 1)
    best, outs = {}, {}
    for _ in range(a.repeats):
        for key, (fn, unet) in runs.items():
            # the mid block's first resnet runs only in full evaluations (the helper wraps the
            # mid block's forward, so a hook on the block itself would also see cached calls)
            full = CountCalls(unet.mid_block.resnets[0])
            out, seconds, calls, peak, cpu = measure(lambda: fn(key[1], a.steps), unet, a.device)
            full.handle.remove()
            outs[key] = out
            old = best.get(key, (float("inf"), float("inf"), calls, full.n, 0.0))
            best[key] = (min(old[0], seconds), min(old[1], cpu), calls, full.n, max(old[4], peak))
    diff = (float(np.abs(outs["ours", True] - outs["reference", True]).max())
            if a.device == "cpu" and a.dtype == "float32" else None)

    o, r, o0, r0 = best["ours", True], best["reference", True], best["ours", False], best["reference", False]
    print(f"\nDeepCache(cache_interval={a.cache_interval}, cache_branch_id={a.cache_branch_id}), {a.model}, "
          f"{a.size}x{a.size}, {a.steps} steps (pndm), CFG 7.5, {a.device} {a.dtype}, {a.threads} thread(s)")
    print("| | ours | reference (DeepCacheSDHelper) | ratio |")
    print("|---|---|---|---|")
    print(f"| wall time (s) | {o[0]:.2f} | {r[0]:.2f} | **{o[0] / r[0]:.2f}** |")
    print(f"| CPU time of the process (s) | {o[1]:.2f} | {r[1]:.2f} | **{o[1] / r[1]:.2f}** |")
    print(f"| speed-up over the same pipeline without DeepCache (wall) | {o0[0] / o[0]:.2f}x "
          f"| {r0[0] / r[0]:.2f}x | |")
    print(f"| UNet evaluations (full ones) | {o[2]} ({o[3]}) | {r[2]} ({r[3]}) | |")
    print(f"| peak memory growth (MiB) | {o[4]:.0f} | {r[4]:.0f} | {o[4] / max(r[4], 1e-9):.2f} |")
    if diff is not None:
        print(f"| max abs image difference | {diff:.1e} | | |")


if __name__ == "__main__":
    main()
