"""bfloat16 on the CPU: ours float32 vs ours bfloat16 vs diffusers bfloat16 (and float32).

    python benchmarks/bench_dtype.py                 # SD1.5 architecture, 256x256, 3 euler steps (~4 min)
    python benchmarks/bench_dtype.py --model sd15-small --steps 2

Same random weights (bfloat16: the float32 ones rounded), prompt, seed and scheduler in all
four; one process, one torch thread, the four runs alternating (best of --repeats after a
one-step warm-up of each, without decoding). Prints wall and CPU time (CPU time is steadier
on a shared machine), peak memory growth, PSNR of each bf16 image vs its float32 image, and how much of
the CPU's bf16 (and float32) matmul rate one UNet evaluation achieves (FLOPs counted with
torch.utils.flop_counter.FlopCounterMode; rate of a 2048x2048 matmul).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench import measure, options  # noqa: E402
from models import build  # noqa: E402

from controldiff.precision import cpu_has_native_bf16  # noqa: E402
from controldiff.schedulers import DIFFUSERS_EQUIVALENT  # noqa: E402

PROMPT = "a photo of a cat"


def best_cpu_seconds(fn, repeats: int = 3) -> float:
    """The least CPU time (process_time) of ``repeats`` calls (warm up first)."""
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        best = min(best, time.process_time() - c0)
    return best


def matmul_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = (torch.randn(n, n, generator=torch.Generator().manual_seed(i)).to(dtype) for i in (0, 1))
    a @ b
    return 2 * n ** 3 / best_cpu_seconds(lambda: a @ b) / 1e9


def unet_inputs(pipe, size: int, dtype: torch.dtype) -> tuple:
    """One CFG step's UNet input: batch 2 latents, a timestep, text embeddings."""
    c, f = pipe.unet.config.in_channels, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, size // f, size // f, generator=g).to(dtype)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g).to(dtype)
    return x, torch.tensor(500.0), text


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-20))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    options(p, model="sd15", size=256, steps=3, repeats=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.device != "cpu":
        raise SystemExit("--device: this benchmark measures the CPU")
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)

    pipes = {}
    for dtype in (torch.float32, torch.bfloat16):
        ref, ours = build(a.model, dtype=dtype)
        ours.progress = False
        ref.set_progress_bar_config(disable=True)
        cls, extra = DIFFUSERS_EQUIVALENT["euler"]
        ref.scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config, **extra)
        name = str(dtype).removeprefix("torch.")
        pipes["ours", name], pipes["diffusers", name] = ours, ref
    common = dict(height=a.size, width=a.size, guidance_scale=7.5)

    def generate(key, steps, output_type="np"):
        pipe, kw = pipes[key], dict(common, num_inference_steps=steps, output_type=output_type)
        if key[0] == "ours":
            return pipe(PROMPT, scheduler="euler", seed=0, **kw).images
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images

    order = [("ours", "float32"), ("ours", "bfloat16"), ("diffusers", "bfloat16"), ("diffusers", "float32")]
    for key in order:   # warm-up: one step each, no decode (the best of --repeats leaves its first call out)
        generate(key, 1, "latent")
    best, images = {}, {}
    for _ in range(a.repeats):
        for key in order:
            run = measure(lambda: generate(key, a.steps), pipes[key].unet, "cpu")
            images[key] = run.out
            old = best.get(key, (float("inf"), float("inf"), 0.0))
            best[key] = (min(old[0], run.seconds), min(old[1], run.cpu), max(old[2], run.peak_mb))

    # one UNet evaluation (a CFG step): its FLOPs, its CPU time, the matmul rate
    ours32, ours16 = pipes["ours", "float32"], pipes["ours", "bfloat16"]
    # the CPU's fused attention kernel has no formula in torch's table: give it SDPA's
    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    counter = FlopCounterMode(display=False, custom_mapping={
        cpu_sdpa: lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)})
    with counter:
        ours16.unet(*unet_inputs(ours16, a.size, torch.bfloat16))
    flops = counter.get_total_flops()
    step_s = {name: best_cpu_seconds(lambda: pipe.unet(*unet_inputs(pipe, a.size, dtype)), repeats=1)
              for name, pipe, dtype in (("float32", ours32, torch.float32), ("bfloat16", ours16, torch.bfloat16))}
    rate = {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}

    caps = torch.cpu.get_capabilities()
    print(f"\n{a.model}, {a.size}x{a.size}, {a.steps} euler steps, CFG 7.5, cpu, {a.threads} thread(s), "
          f"torch {torch.__version__}, {caps.get('cpu_name', '?')}, native bf16: {cpu_has_native_bf16()}")
    print("| run | wall s | CPU s | CPU time vs ours float32 | peak memory growth (MiB) | PSNR vs its float32 |")
    print("|---|---|---|---|---|---|")
    base = best["ours", "float32"][1]
    for key in order:
        wall, cpu, peak = best[key]
        same = psnr(images[key], images[key[0], "float32"]) if key[1] == "bfloat16" else None
        print(f"| {key[0]} {key[1]} | {wall:.2f} | {cpu:.2f} | {cpu / base:.2f} | {peak:.0f} | "
              f"{'' if same is None else f'{same:.1f} dB'} |")
    o, d = best["ours", "bfloat16"], best["diffusers", "bfloat16"]
    o32, d32 = best["ours", "float32"], best["diffusers", "float32"]
    print(f"\nCPU time ratios: ours bf16 / ours fp32 **{o[1] / o32[1]:.2f}** (speed-up {o32[1] / o[1]:.2f}x); "
          f"ours bf16 / diffusers bf16 **{o[1] / d[1]:.2f}**; ours fp32 / diffusers fp32 **{o32[1] / d32[1]:.2f}**")
    print(f"wall time ratios: {o[0] / o32[0]:.2f}, {o[0] / d[0]:.2f}, {o32[0] / d32[0]:.2f}")
    diff = float(np.abs(images["ours", "float32"] - images["diffusers", "float32"]).max())
    print(f"ours vs diffusers, float32 images: max abs {diff:.1e}; bf16: PSNR "
          f"{psnr(images['ours', 'bfloat16'], images['diffusers', 'bfloat16']):.1f} dB")
    print(f"\none UNet evaluation (batch 2, {a.size // 8}x{a.size // 8} latents): {flops / 1e9:.0f} GFLOP")
    for name in ("float32", "bfloat16"):
        achieved = flops / step_s[name] / 1e9
        print(f"  {name}: {step_s[name]:.2f} CPU s = {achieved:.0f} GFLOP/s; 2048x2048 matmul {rate[name]:.0f} GFLOP/s "
              f"-> {achieved / rate[name]:.0%} of it")


if __name__ == "__main__":
    main()
