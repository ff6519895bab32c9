"""What every control does, measured on the embedded default model (``controldiff.demo``):
each row the same captions and seeds without and with the control, read by the pixel judge.

    python benchmarks/bench_demo_controls.py [--model FOLDER] [--only NAME ...]

Prints a markdown table (the one in benchmarks/RESULTS.md and the README) and the time.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from controldiff import PAG, SAG, Pipeline, load_controlnet  # noqa: E402
from controldiff.demo import default_model_path, measure, measure_editing  # noqa: E402
from controldiff.demo.variants import variant_path  # noqa: E402


def _new_shape(pipe: Pipeline, method: str) -> dict:
    return measure.new_shape(pipe, pipe.path, tempfile.mkdtemp(), method)


ROWS = {
    "base": measure.base,
    "negative prompt": measure.negative_prompt,
    "SEGA": measure.sega,
    "img2img strength": measure.img2img_strength,
    "inpainting": measure.inpainting,
    "Regions": measure.regions,
    "MultiDiffusion": measure.panorama_seams,
    "Attend-and-Excite": measure.attend_and_excite,
    "TIME": measure.model_editing,
    "SAG": lambda pipe: measure.guidance(pipe, SAG(0.75)),
    "PAG": lambda pipe: measure.guidance(pipe, PAG(3.0)),
    "LoRA new shape": lambda pipe: _new_shape(pipe, "lora"),
    "DreamBooth new shape": lambda pipe: _new_shape(pipe, "dreambooth"),
    "textual inversion new shape": lambda pipe: _new_shape(pipe, "textual-inversion"),
    "Custom Diffusion new shape": lambda pipe: _new_shape(pipe, "custom-diffusion"),
    "Pix2Pix-Zero": measure_editing.pix2pix_zero,
    "DiffEdit": measure_editing.diffedit,
    "LEDITS++": measure_editing.ledits,
    "ControlNet (edges)": lambda pipe: measure.controlnet(pipe, load_controlnet(variant_path("controlnet-edges"))),
    "ControlNet (positions)": lambda pipe: measure.controlnet(
        pipe, load_controlnet(variant_path("controlnet-positions")), "positions"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--only", nargs="*", default=None, choices=list(ROWS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.model or default_model_path(), dtype=torch.float32)
    pipe.progress = False
    for name in args.only or ROWS:
        t0 = time.perf_counter()
        result = ROWS[name](pipe)
        print(json.dumps({"row": name, "result": result, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
