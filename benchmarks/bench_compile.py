"""Compiled vs eager: ``pipe.compile()`` against our eager loop, and diffusers eager vs
``torch.compile(unet)`` for reference.

    python benchmarks/bench_compile.py                          # CPU, one thread, sd15 at 256x256
    python benchmarks/bench_compile.py --dtypes float32 --no-diffusers --steps 4

Same random weights (SD1.5's layout), prompt, seed, DDIM, CFG 7.5, latents out (the loop
only). Each run is warmed up with a 1-step call (for compiled runs: the compile, timed and
reported apart), then timed over --steps steps: steps/s (wall) and process CPU seconds per
step (the machine may be shared; compile workers are other processes, so compile CPU time
is not counted). For float32 also the largest difference of the compiled latents from eager.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench import options  # noqa: E402
from models import build  # noqa: E402

from controldiff.compile import graphs_compiled  # noqa: E402


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    options(p, model="sd15", size=256, steps=2, repeats=1)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers (its whole-UNet compile is slow)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import diffusers

    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    prompt, seed = "a photo of a cat", 0
    common = dict(height=a.size, width=a.size, guidance_scale=7.5, output_type="latent")
    rows = []
    for name in a.dtypes.split(","):
        dtype = getattr(torch, name)
        ref, ours = build(a.model, device=a.device, dtype=dtype)
        ours.progress = False
        ref.set_progress_bar_config(disable=True)
        ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
        eager_unet = ref.unet

        def run_ours(steps):
            return ours(prompt, num_inference_steps=steps, seed=seed, scheduler="ddim", **common).images

        def run_ref(steps):
            return ref(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **common).images

        variants = [("ours", "eager", run_ours, lambda: None), ("ours", "compiled", run_ours, ours.compile)]
        if not a.no_diffusers:
            variants += [("diffusers", "eager", run_ref, lambda: None),
                         ("diffusers", "compiled", run_ref,
                          lambda: setattr(ref, "unet", torch.compile(eager_unet)))]
        outs = {}
        for impl, how, run, prepare in variants:
            prepare()
            graphs = graphs_compiled()
            _, warm, _ = timed(lambda: run(1))
            best = (float("inf"), float("inf"))
            for _ in range(max(a.repeats, 1)):
                out, wall, cpu = timed(lambda: run(a.steps))
                best = (min(best[0], wall), min(best[1], cpu))
            outs[impl, how] = out
            rows.append(dict(dtype=name, impl=impl, how=how, steps_per_s=a.steps / best[0],
                             cpu_per_step=best[1] / a.steps, first_call=warm, graphs=graphs_compiled() - graphs))
            print(rows[-1], flush=True)
        ours.uncompile()
        if name == "float32":
            for impl in ("ours", "diffusers"):
                if (impl, "compiled") in outs:
                    diff = float((outs[impl, "compiled"] - outs[impl, "eager"]).abs().max())
                    print(f"{impl} float32 compiled vs eager latents: max abs {diff:.2e}")

    print(f"\n{a.model}, {a.size}x{a.size}, {a.steps} DDIM steps, CFG 7.5 (batch 2), latents out, {a.device}, "
          f"{a.threads} thread(s), torch {torch.__version__}, best of {max(a.repeats, 1)} after a 1-step warm-up")
    print("| dtype | impl | eager steps/s (CPU s/step) | compiled steps/s (CPU s/step) | compiled/eager CPU time "
          "| first call compiled (graphs) |")
    print("|---|---|---|---|---|---|")
    by = {(r["dtype"], r["impl"], r["how"]): r for r in rows}
    for (dtype, impl, how), r in by.items():
        if how != "compiled":
            continue
        e = by[dtype, impl, "eager"]
        print(f"| {dtype} | {impl} | {e['steps_per_s']:.3f} ({e['cpu_per_step']:.2f}) | {r['steps_per_s']:.3f} "
              f"({r['cpu_per_step']:.2f}) | {r['cpu_per_step'] / e['cpu_per_step']:.2f} | {r['first_call']:.0f} s "
              f"({r['graphs']}) |")


if __name__ == "__main__":
    main()
