"""Speed and memory of controldiff vs diffusers on the same random-weight model.

One implementation per process (so peak memory is its own):
    python benchmarks/bench.py --impl ours --model sd15 --size 256 --steps 10
Both, with ratios, written to benchmarks/RESULTS.md:
    python benchmarks/run_all.py
Models are built in memory with diffusers' classes from a fixed seed; ours loads the
very same weights (state dicts copied), so both compute the same images.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import build  # noqa: E402


class PeakRSS:
    """Peak resident memory above the starting point, sampled every 20 ms (CPU runs; faster polling slows torch)."""

    def __init__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class CountCalls:
    """Counts UNet evaluations (batched calls) during generation."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.n += 1


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc keeps them), so each run's resident-set
    growth is its own and not hidden by what the previous run freed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Run(NamedTuple):
    out: object
    seconds: float
    calls: int       # UNet evaluations
    peak_mb: float   # resident growth (CPU) or peak CUDA allocation above the start
    cpu: float       # CPU seconds of this process


def measure(fn, unet, device: str) -> Run:
    """One call of ``fn`` with its wall and CPU time, UNet calls and peak memory."""
    cuda = device.startswith("cuda")
    gc.collect()
    release_free_memory()
    counter = CountCalls(unet)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    counter.handle.remove()
    peak = torch.cuda.max_memory_allocated() - base if cuda else rss.peak - rss.base
    return Run(out, seconds, counter.n, peak / 2**20, cpu)


def photo(size: int, seed: int = 0) -> PIL.Image.Image:
    """A smooth random test image (8x8 random colours, upsampled)."""
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), PIL.Image.BICUBIC)


def run(impl: str, model: str, size: int, steps: int, device: str, dtype: torch.dtype, repeats: int,
        scheduler: str, batch: int) -> dict:
    ref, ours = build(model, device=device, dtype=dtype, need_ours=impl == "ours")
    pipe = ours if impl == "ours" else ref
    if impl == "ours":
        pipe.progress = False
        call = lambda: pipe("a photo of a cat", height=size, width=size, num_inference_steps=steps,  # noqa: E731
                            guidance_scale=7.5, scheduler=scheduler, seed=0, num_images_per_prompt=batch,
                            output_type="np").images
        unet = pipe.unet
    else:
        import diffusers
        from controldiff.schedulers import DIFFUSERS_EQUIVALENT
        name, extra = DIFFUSERS_EQUIVALENT[scheduler]
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
        pipe.set_progress_bar_config(disable=True)
        call = lambda: pipe("a photo of a cat", height=size, width=size, num_inference_steps=steps,  # noqa: E731
                            guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                            num_images_per_prompt=batch, output_type="np").images
        unet = pipe.unet
        del ours
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    call()  # warm-up
    sync()
    counter = CountCalls(unet)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    with PeakRSS() as rss:
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            images = call()
            sync()
            times.append(time.perf_counter() - t0)
    counter.handle.remove()
    peak = (torch.cuda.max_memory_allocated() - base) if device.startswith("cuda") else (rss.peak - rss.base)
    best = min(times)
    return {
        "impl": impl, "model": model, "size": size, "steps": steps, "device": device, "dtype": str(dtype),
        "batch": batch, "scheduler": scheduler,
        "seconds_per_image": best / batch, "it_per_s": steps / best,
        "peak_mem_mb": peak / 2**20, "unet_calls_per_step": counter.n / (repeats * steps),
        "checksum": float(abs(images).mean()),
    }


def options(p: argparse.ArgumentParser, model: str = "sd15-small", size: int = 256, steps: int = 4,
            repeats: int = 2, help: dict | None = None) -> argparse.ArgumentParser:
    """The options every benchmark takes: --model --size --steps --repeats --device --dtype."""
    help = help or {}
    for name, default in (("model", model), ("size", size), ("steps", steps), ("repeats", repeats)):
        kind = str if name == "model" else int
        p.add_argument(f"--{name}", type=kind, default=default, help=help.get(name))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    return p


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--impl", choices=["ours", "diffusers"], required=True)
    options(p, model="tiny", size=64, steps=10)
    p.add_argument("--scheduler", default="euler")
    p.add_argument("--batch", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    res = run(a.impl, a.model, a.size, a.steps, a.device, getattr(torch, a.dtype), a.repeats, a.scheduler, a.batch)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
