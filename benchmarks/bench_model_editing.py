"""TIME model editing vs diffusers' StableDiffusionModelEditingPipeline (its layer lookup
repaired, as in tests/test_model_editing.py: as shipped it edits nothing).

    python benchmarks/bench_model_editing.py --model sd15     # SD1.5 architecture, random weights

Both pipelines start from the same UNet tensors (models.build); the reference with
restart_params=True swaps in copies of its kept originals before editing, so neither sees
the other's edits; ours is reset after each edit. Prints wall time of one edit (best of --repeats,
alternating) and peak resident memory growth.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench import PeakRSS  # noqa: E402
from models import build  # noqa: E402

SOURCE, DESTINATION = "a pack of roses", "a pack of blue roses"


def reference(ref):
    import diffusers

    pipe = diffusers.StableDiffusionModelEditingPipeline(
        vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet, scheduler=ref.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    width = pipe.unet.config.cross_attention_dim
    layers = [m for m in pipe.unet.modules()
              if type(m).__name__ == "Attention" and m.is_cross_attention and m.to_v.in_features == width]
    pipe.ca_clip_layers = layers
    pipe.projection_matrices = [l.to_v for l in layers] + [l.to_k for l in layers]
    pipe.og_matrices = [copy.deepcopy(l.to_v) for l in layers] + [copy.deepcopy(l.to_k) for l in layers]
    return pipe


def timed(fn) -> tuple[float, float]:
    with PeakRSS() as mem:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, (mem.peak - mem.base) / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sd15")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    ref, ours = build(args.model)
    ours.progress = False
    ref = reference(ref)
    layers = len(ref.ca_clip_layers)
    results = {"ours": [], "diffusers": []}
    for _ in range(args.repeats):
        results["diffusers"].append(timed(lambda: ref.edit_model(SOURCE, DESTINATION, lamb=0.1, restart_params=True)))
        results["ours"].append(timed(lambda: ours.edit_model(SOURCE, DESTINATION, lamb=0.1)))
        ours.reset_model_edits()
    o, d = min(results["ours"]), min(results["diffusers"])
    print("| model | cross-attention layers | ours s | diffusers s | time ratio | peak MB ours | peak MB diffusers |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.model} | {layers} | {o[0]:.3f} | {d[0]:.3f} | **{o[0] / d[0]:.2f}** | {o[1]:.0f} | {d[1]:.0f} |")


if __name__ == "__main__":
    main()
