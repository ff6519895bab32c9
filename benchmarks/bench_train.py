"""Training speed and memory, each method: ours (controldiff.training) vs its diffusers example
script (vendored in tests/reference/, torchvision shim): LoRA train_dreambooth_lora.py, DreamBooth
train_dreambooth.py, textual inversion textual_inversion.py, Custom Diffusion
train_custom_diffusion.py; on the same random-weight model folder and images, same settings and seed.

Each run is a fresh subprocess (one torch thread); a step's time is (time of S steps - time
of 1 step) / (S - 1), so loading and saving cancel out; CPU time likewise (the machine is
shared: CPU time is the fairer number). Peak memory is the process's max RSS. Rounds alternate
which side runs first; each side's best round (by CPU time) is reported.

    python benchmarks/bench_train.py --model sd15-small --size 256 --steps 10 [--method lora ...]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]


def prepare(model: str, size: int, root: Path) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    from models import build

    folder, data = root / model, root / "data"
    if not (folder / "model_index.json").is_file():
        ref, _ = build(model, need_ours=False)
        ref.save_pretrained(folder)
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(data / f"{i}.png")
    return folder, data


PROMPT = "a photo of sks"
#: method -> (its script, the script's arguments beyond the shared ones, our lr); the same settings both sides
METHODS = {
    "lora": ("train_dreambooth_lora", ["--instance_prompt", PROMPT, "--rank", "4"], 1e-4),
    "dreambooth": ("train_dreambooth", ["--instance_prompt", PROMPT], 5e-6),
    "textual-inversion": ("textual_inversion", ["--placeholder_token", "<sks>", "--initializer_token", "a",
                                                "--save_steps", "100000"], 5e-4),
    "custom-diffusion": ("train_custom_diffusion", ["--instance_prompt", "a photo of <new1>", "--modifier_token",
                                                    "<new1>", "--initializer_token", "a",
                                                    "--dataloader_num_workers", "0"], 1e-5),
}


def ours(method: str):
    from controldiff.training import CustomDiffusion, DreamBooth, LoRA, TextualInversion

    return {"lora": lambda: LoRA(rank=4), "dreambooth": DreamBooth,
            "textual-inversion": lambda: TextualInversion("<sks>", "a", repeats=1),
            "custom-diffusion": lambda: CustomDiffusion("<new1>", "a")}[method]()


def one(impl: str, method: str, folder: str, data: str, size: int, steps: int, out: str) -> dict:
    import torch

    torch.set_num_threads(1)
    name, extra, lr = METHODS[method]
    if impl == "ours":
        from controldiff.training import TrainConfig, train

        prompt = {"textual-inversion": None, "custom-diffusion": "a photo of <new1>"}.get(method, PROMPT)
        fmt = "both" if method == "textual-inversion" else "diffusers"

        def run():
            train(folder, ours(method), TrainConfig(Path(data), Path(out), prompt=prompt, resolution=size, lr=lr,
                                                    steps=steps, seed=0, progress=False, format=fmt))
    else:
        import accelerate, diffusers, peft, transformers  # noqa: F401  (before the shim)
        from reference import torchvision_shim

        torchvision_shim.install()
        script = importlib.import_module(f"reference.{name}")
        data_arg = "--train_data_dir" if method == "textual-inversion" else "--instance_data_dir"
        argv = ["--pretrained_model_name_or_path", folder, data_arg, data, "--output_dir", out, "--resolution",
                str(size), "--train_batch_size", "1", "--max_train_steps", str(steps), "--learning_rate", str(lr),
                "--seed", "0", "--report_to", "all", "--checkpointing_steps", "100000", *extra]
        if method == "textual-inversion":  # its parse_args reads sys.argv
            sys.argv = ["script", *argv]
            args = script.parse_args()
        else:
            args = script.parse_args(argv)
        script.args = args

        def run():
            script.main() if method == "textual-inversion" else script.main(args)
    t, c = time.perf_counter(), time.process_time()
    run()
    return {"wall": time.perf_counter() - t, "cpu": time.process_time() - c,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(impl, method, folder, data, size, steps, root) -> dict:
    runs = {}
    for n in (1, steps):
        cmd = [sys.executable, __file__, "--child", impl, method, str(folder), str(data), str(size), str(n),
               str(root / f"out-{method}-{impl}-{n}")]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        line = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
        runs[n] = json.loads(line)
    k = steps - 1
    return {"s_per_step": (runs[steps]["wall"] - runs[1]["wall"]) / k,
            "cpu_s_per_step": (runs[steps]["cpu"] - runs[1]["cpu"]) / k,
            "peak_rss_mib": runs[steps]["peak_rss_mib"]}


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        impl, method, folder, data, size, steps, out = sys.argv[2:9]
        print(json.dumps(one(impl, method, folder, data, int(size), int(steps), out)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15-small")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--method", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--repeats", type=int, default=2, help="rounds, the order alternating; the best of each is kept")
    p.add_argument("--root", type=Path, default=Path("/tmp/controldiff-bench-train"))
    a = p.parse_args(argv)
    folder, data = prepare(a.model, a.size, a.root)
    for method in a.method:
        rounds = {"ours": [], "diffusers": []}
        for r in range(a.repeats):
            for impl in ("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours"):
                rounds[impl].append(measure(impl, method, folder, data, a.size, a.steps, a.root))
        res = {impl: min(runs, key=lambda m: m["cpu_s_per_step"]) for impl, runs in rounds.items()}
        for impl, r in res.items():
            print(f"{method:18s} {impl:9s} {1 / r['s_per_step']:.3f} steps/s  CPU {r['cpu_s_per_step']:.2f} s/step  "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB")
        o, d = res["ours"], res["diffusers"]
        print(f"{method:18s} ratio ours/diffusers: wall {o['s_per_step'] / d['s_per_step']:.2f}, CPU "
              f"{o['cpu_s_per_step'] / d['cpu_s_per_step']:.2f}, peak RSS {o['peak_rss_mib'] / d['peak_rss_mib']:.2f}")
        print(json.dumps({"method": method, "model": a.model, "size": a.size, "steps": a.steps, **res}), flush=True)


if __name__ == "__main__":
    main()
