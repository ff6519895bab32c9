"""Controls vs their reference pipelines: wall time ratio and UNet calls per step.

    python benchmarks/bench_controls.py                      # CPU, SD1.5 layout with narrow channels
    python benchmarks/bench_controls.py --model sd15 --device cuda --dtype float16 --wide 2048

Same weights, prompt, seed and scheduler in both; the two implementations alternate
in one process (best of --repeats). Appends a table to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import controldiff as cd  # noqa: E402
from bench import options  # noqa: E402
from models import build  # noqa: E402


class Counter:
    def __init__(self, *modules):
        self.n = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, *args):
        self.n += 1

    def close(self):
        for h in self.handles:
            h.remove()


def our_controlnet(ref_cn, device, dtype):
    from controldiff.models.controlnet import ControlNetModel

    with torch.device("meta"):
        cn = ControlNetModel(dict(ref_cn.config))
    cn.load_state_dict(ref_cn.state_dict(), assign=True)
    return cn.to(device, dtype).eval().requires_grad_(False)


def cases(ref, size: int, wide: int, device, dtype):
    import diffusers

    edge = PIL.Image.fromarray((np.indices((size, size)).sum(0) % 64 < 32).astype(np.uint8) * 255).convert("RGB")
    ref_cn = diffusers.ControlNetModel.from_unet(ref.unet).to(device, dtype).eval()
    cn = our_controlnet(ref_cn, device, dtype)
    concepts = ["smiling", "wearing glasses"]
    return {
        "SEGA, 2 concepts": (
            diffusers.SemanticStableDiffusionPipeline.from_pipe(ref),
            dict(editing_prompt=concepts, edit_guidance_scale=[5.0, 5.0], edit_warmup_steps=[2, 2],
                 edit_threshold=[0.9, 0.9], reverse_editing_direction=[False, False]),
            dict(controls=[cd.SEGA([cd.Concept(c, scale=5.0, warmup=2) for c in concepts])]),
            size, size),
        "SAG": (diffusers.StableDiffusionSAGPipeline.from_pipe(ref), dict(sag_scale=0.75),
                dict(controls=[cd.SAG(0.75)]), size, size),
        "ControlNet": (diffusers.StableDiffusionControlNetPipeline.from_pipe(ref, controlnet=ref_cn),
                       dict(image=edge), dict(controls=[cd.ControlNet(cn, edge)]), size, size),
        f"panorama {size}x{wide}": (diffusers.StableDiffusionPanoramaPipeline.from_pipe(ref), dict(),
                                    dict(controls=[cd.MultiDiffusion()]), size, wide),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    options(p, model="sd15-small", size=512, steps=4, repeats=2)
    p.add_argument("--wide", type=int, default=1024)
    p.add_argument("--only", default=None, help="run only cases whose name contains this")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--label", default=None)
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    dtype = getattr(torch, a.dtype)
    ref, ours = build(a.model, device=a.device, dtype=dtype)
    ours.progress = False
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    rows = []
    for name, (ref_pipe, ref_kw, our_kw, h, w) in cases(ref, a.size, a.wide, a.device, dtype).items():
        if a.only and a.only not in name:
            continue
        ref_pipe.set_progress_bar_config(disable=True)
        common = dict(height=h, width=w, num_inference_steps=a.steps, guidance_scale=7.5, output_type="np")
        run_ref = lambda: ref_pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **common, **ref_kw).images  # noqa: E731
        run_ours = lambda: ours("a photo of a cat", seed=0, scheduler="pndm", **common, **our_kw).images  # noqa: E731
        best = {"ref": float("inf"), "ours": float("inf")}
        calls = {}
        for r in range(a.repeats + 1):  # the first round warms up
            for key, fn, unet in (("ref", run_ref, ref_pipe.unet), ("ours", run_ours, ours.unet)):
                counter = Counter(unet)
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                dt = time.perf_counter() - t0
                counter.close()
                calls[key] = counter.n / a.steps
                if r:
                    best[key] = min(best[key], dt)
        diff = float(np.abs(run_ours() - run_ref()).max()) if a.device == "cpu" and a.dtype == "float32" else None
        ratio = best["ours"] / best["ref"]
        rows.append((name, best, calls, ratio, diff))
        print(f"{name}: ours {best['ours']:.2f}s vs reference {best['ref']:.2f}s -> ratio {ratio:.2f}; "
              f"UNet calls/step {calls['ours']:.1f} vs {calls['ref']:.1f}"
              + (f"; max abs diff {diff:.1e}" if diff is not None else ""), flush=True)
    label = a.label or f"{a.device} {a.dtype}"
    lines = [f"\n### Controls vs reference pipelines — {label}, model {a.model}, {a.steps} steps, CFG 7.5, pndm\n",
             "| technique | ours s/img | reference s/img | time ratio | UNet calls/step ours / ref | max abs diff |",
             "|---|---|---|---|---|---|"]
    for name, best, calls, ratio, diff in rows:
        d = "n/a" if diff is None else f"{diff:.1e}"
        lines.append(f"| {name} | {best['ours']:.2f} | {best['ref']:.2f} | **{ratio:.2f}** | "
                     f"{calls['ours']:.1f} / {calls['ref']:.1f} | {d} |")
    text = "\n".join(lines) + "\n"
    with open(a.out, "a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
