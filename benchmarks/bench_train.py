"""LoRA training speed and memory: ours (controldiff.training) vs diffusers'
examples/dreambooth/train_dreambooth_lora.py (vendored in tests/reference/, torchvision shim)
on the same random-weight model folder and images, same settings and seed.

Each run is a fresh subprocess (one torch thread); a step's time is (time of S steps - time
of 1 step) / (S - 1), so loading and saving cancel out; CPU time likewise (the machine is
shared: CPU time is the fairer number). Peak memory is the process's max RSS.

    python benchmarks/bench_train_lora.py --model sd15-small --size 256 --steps 4
"""
from __future__ import annotations

import argparse
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


def one(impl: str, folder: str, data: str, size: int, steps: int, out: str) -> dict:
    import torch

    torch.set_num_threads(1)
    if impl == "ours":
        from controldiff.training import LoRA, TrainConfig, train

        def run():
            train(folder, LoRA(rank=4), TrainConfig(Path(data), Path(out), prompt="a photo of sks", resolution=size,
                                                   steps=steps, seed=0, progress=False, format="diffusers"))
    else:
        import accelerate, diffusers, peft, transformers  # noqa: F401  (before the shim)
        from reference import torchvision_shim

        torchvision_shim.install()
        import reference.train_dreambooth_lora as script

        args = script.parse_args([
            "--pretrained_model_name_or_path", folder, "--instance_data_dir", data, "--instance_prompt",
            "a photo of sks", "--output_dir", out, "--resolution", str(size), "--train_batch_size", "1",
            "--max_train_steps", str(steps), "--learning_rate", "1e-4", "--seed", "0", "--rank", "4",
            "--report_to", "all", "--checkpointing_steps", "100000"])
        script.args = args

        def run():
            script.main(args)
    t, c = time.perf_counter(), time.process_time()
    run()
    return {"wall": time.perf_counter() - t, "cpu": time.process_time() - c,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(impl, folder, data, size, steps, root) -> dict:
    runs = {}
    for n in (1, steps):
        cmd = [sys.executable, __file__, "--child", impl, str(folder), str(data), str(size), str(n),
               str(root / f"out-{impl}-{n}")]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        line = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
        runs[n] = json.loads(line)
    k = steps - 1
    return {"s_per_step": (runs[steps]["wall"] - runs[1]["wall"]) / k,
            "cpu_s_per_step": (runs[steps]["cpu"] - runs[1]["cpu"]) / k,
            "peak_rss_mib": runs[steps]["peak_rss_mib"]}


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        impl, folder, data, size, steps, out = sys.argv[2:8]
        print(json.dumps(one(impl, folder, data, int(size), int(steps), out)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15-small")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--root", type=Path, default=Path("/tmp/controldiff-bench-train"))
    a = p.parse_args(argv)
    folder, data = prepare(a.model, a.size, a.root)
    res = {impl: measure(impl, folder, data, a.size, a.steps, a.root) for impl in ("ours", "diffusers")}
    for impl, r in res.items():
        print(f"{impl:9s} {1 / r['s_per_step']:.3f} steps/s  CPU {r['cpu_s_per_step']:.2f} s/step  "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    o, d = res["ours"], res["diffusers"]
    print(f"time ratio (ours/diffusers): wall {o['s_per_step'] / d['s_per_step']:.2f}, "
          f"CPU {o['cpu_s_per_step'] / d['cpu_s_per_step']:.2f}, peak RSS {o['peak_rss_mib'] / d['peak_rss_mib']:.2f}")
    print(json.dumps({"model": a.model, "size": a.size, "steps": a.steps, **res}))


if __name__ == "__main__":
    main()
