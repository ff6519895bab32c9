"""Attend-and-Excite: ours vs diffusers' StableDiffusionAttendAndExcitePipeline.

    python benchmarks/bench_attend_excite.py                        # CPU, SD1.5 layout, narrow channels, 512 px
    python benchmarks/bench_attend_excite.py --model sd15 --device cuda --dtype float16

Same weights, prompt, seed and scheduler (PNDM); the two alternate in one process (best
of --repeats after a warm-up round). Reported: seconds per run, UNet forward calls per step
(our attention pass stops after the last map it reads, still counted as one), peak memory
above the run's start (CPU: resident set size sampled every 20 ms, as bench.py; CUDA:
max_memory_allocated) and the largest latent difference. Prints a markdown table.
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

from controldiff.controls.attend_excite import AttendAndExcite  # noqa: E402
from controldiff.text.tokens import find_tokens  # noqa: E402

PROMPT = "a photo of a cat and a frog"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    options(p, model="sd15-small", size=512, steps=3, repeats=2)
    p.add_argument("--images", type=int, default=1, help="images per prompt")
    p.add_argument("--threshold", type=float, default=None,
                   help="a refinement threshold at step 0 (20 extra passes per image on a random model)")
    p.add_argument("--no-warmup", action="store_true", help="count the first round too (slow sizes)")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    dtype = getattr(torch, a.dtype)
    ref, ours = build(a.model, device=a.device, dtype=dtype)
    ours.progress = False
    import diffusers

    ref_pipe = diffusers.StableDiffusionAttendAndExcitePipeline.from_pipe(ref)
    ref_pipe.set_progress_bar_config(disable=True)
    tok = ref_pipe.tokenizer
    words = ["cat", "frog"]   # ours takes the words, the reference their positions
    indices = [i for w in words for i in find_tokens(tok(PROMPT).input_ids, tok(w, add_special_tokens=False).input_ids)]
    thresholds = {} if a.threshold is None else {0: a.threshold}
    ae = dict(max_iter_to_alter=a.steps, thresholds=thresholds, scale_factor=20, attn_res=(a.size // 32,) * 2)
    common = dict(height=a.size, width=a.size, num_inference_steps=a.steps, guidance_scale=7.5,
                  num_images_per_prompt=a.images, output_type="latent")
    runs = {
        "reference": (lambda: ref_pipe(PROMPT, token_indices=indices, generator=torch.Generator().manual_seed(0),
                                       **ae, **common).images, ref_pipe.unet),
        "ours": (lambda: ours(PROMPT, seed=0, scheduler="pndm", controls=[AttendAndExcite(words, **ae)],
                              **common).images, ours.unet),
    }
    best = {k: [float("inf"), 0, 0, None] for k in runs}
    first = 1 if a.no_warmup else 0
    for r in range(first, a.repeats + 1):   # round 0 warms up
        for key, (fn, unet) in runs.items():
            r = measure(fn, unet, a.device)
            dt, calls, peak, out = r.seconds, r.calls, r.peak_mb * 2**20, r.out
            if r:
                b = best[key]
                b[0], b[1], b[2], b[3] = min(b[0], dt), calls, max(b[2], peak), out
            print(f"round {r} {key}: {dt:.2f}s, {calls} UNet calls, peak +{peak / 2**20:.0f} MiB", flush=True)
    steps = len(ref_pipe.scheduler.timesteps)
    diff = float((best["ours"][3].float() - best["reference"][3].float()).abs().max())
    lines = [f"\n### Attend-and-Excite — {a.device} {a.dtype}, model {a.model}, {a.size}x{a.size}, {a.steps} steps "
             f"({steps} timesteps, PNDM), {a.images} image(s), CFG 7.5, thresholds {thresholds or 'none'}\n",
             "| | seconds | UNet calls/timestep | peak memory MiB |", "|---|---|---|---|"]
    for key in runs:
        t, calls, peak, _ = best[key]
        lines.append(f"| {key} | {t:.2f} | {calls / steps:.2f} | {peak / 2**20:.0f} |")
    o, rf = best["ours"], best["reference"]
    lines.append(f"| ours / reference | **{o[0] / rf[0]:.2f}** | | **{o[2] / max(rf[2], 1):.2f}** |")
    lines.append(f"\nmax abs latent difference: {diff:.1e}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
