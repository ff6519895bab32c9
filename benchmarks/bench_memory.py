"""The UNet memory budget: time and peak memory vs canvas width and vs branches.

    python benchmarks/bench_memory.py                 # CPU, sd15-small, 1 step, 1 thread (~5 min)
    python benchmarks/bench_memory.py --model sd15 --widths 512 1024 --steps 1

Widths: 512 x W panoramas with MultiDiffusion (512-pixel windows, stride --stride), every
view of a step in one call (no budget) or in parts of --budget. Branches: SEGA with 0..8
concepts at --size x --size (2 + k rows a call with CFG), no budget vs --sega-budget.
Peak memory is the process's peak resident growth while the run lasts (the kernel's
VmHWM, reset before each run: it sees torch's CPU tensors, which tracemalloc does not);
latents only (the VAE decode is outside the UNet budget). Wall and process CPU time (the
machine is shared).
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench import CountCalls, options, release_free_memory  # noqa: E402
from models import build  # noqa: E402

import controldiff as cd  # noqa: E402
from controldiff.memory import parse_budget  # noqa: E402


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def measure(fn, unet):
    """(wall s, CPU s, UNet calls, peak resident growth MiB) of one ``fn()``."""
    gc.collect()
    release_free_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # resets VmHWM to the current resident size
    base = _status("VmRSS:")
    calls = CountCalls(unet)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    calls.handle.remove()
    return wall, cpu, calls.n, (_status("VmHWM:") - base) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    options(p, model="sd15-small", size=256, steps=1, repeats=1)
    p.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--stride", type=int, default=512, help="MultiDiffusion stride (pixels)")
    p.add_argument("--budget", default="128MiB")
    p.add_argument("--concepts", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--sega-budget", default="32MiB")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    _, pipe = build(a.model, device=a.device, dtype=getattr(torch, a.dtype))
    pipe.progress = False
    common = dict(num_inference_steps=a.steps, guidance_scale=7.5, scheduler="ddim", output_type="latent", seed=0)

    def run(budget, **kw):
        pipe.memory_budget = budget
        try:
            return measure(lambda: pipe("a photo of a river", **common, **kw), pipe.unet)
        finally:
            pipe.memory_budget = None

    run(math.inf, height=512, width=512)   # warm-up
    head = f"{a.model}, {a.steps} step(s) (ddim), CFG 7.5, {a.device} {a.dtype}, {a.threads} torch thread(s)"
    print(f"\n#### Canvas width: 512 x W, MultiDiffusion(window=512, stride={a.stride}); {head}")
    print(f"| width | views | no budget: wall s / CPU s / peak MiB | budget {a.budget}: wall s / CPU s / peak MiB "
          "| UNet calls (no budget / budget) |")
    print("|---|---|---|---|---|")
    for w in a.widths:
        kw = dict(height=512, width=w, controls=[cd.MultiDiffusion(window=512, stride=a.stride)])
        whole = run(math.inf, **kw)
        split = run(parse_budget(a.budget), **kw)
        views = len(kw["controls"][0].views)
        print(f"| {w} | {views} | {whole[0]:.1f} / {whole[1]:.1f} / {whole[3]:.0f} "
              f"| {split[0]:.1f} / {split[1]:.1f} / {split[3]:.0f} | {whole[2]} / {split[2]} |", flush=True)

    print(f"\n#### Branches: SEGA with k concepts (2 + k rows a call), {a.size}x{a.size}; {head}")
    print(f"| concepts | rows | no budget: wall s / CPU s / peak MiB | budget {a.sega_budget}: wall s / CPU s / peak MiB "
          "| UNet calls (no budget / budget) |")
    print("|---|---|---|---|---|")
    words = ["smiling", "glasses", "a hat", "snow", "sunset", "a boat", "trees", "a bridge"]
    for k in a.concepts:
        kw = dict(height=a.size, width=a.size,
                  controls=[cd.SEGA([cd.Concept(word, scale=3.0, warmup=0) for word in words[:k]])] if k else [])
        whole = run(math.inf, **kw)
        split = run(parse_budget(a.sega_budget), **kw)
        print(f"| {k} | {2 + k} | {whole[0]:.1f} / {whole[1]:.1f} / {whole[3]:.0f} "
              f"| {split[0]:.1f} / {split[1]:.1f} / {split[3]:.0f} | {whole[2]} / {split[2]} |", flush=True)


if __name__ == "__main__":
    main()
