"""The recipe that makes the embedded default model: a 64x64 SD1-style text-to-image model
trained from scratch on synthetic scenes (``demo/scenes.py``) with the project's training
parts (``training/objective.py``'s loss, ``training/ema.py``, ``training/text.py``).

    python -m controldiff.demo.recipe OUT [--vae-steps N] [--steps N] [--threads T]

Two stages, each a pure function of the seed and the step counts:
1. the VAE (latent factor 4: 64x64x3 <-> 16x16x4), MSE + a small KL term, on fresh scenes;
   its ``scaling_factor`` is then set so the latents have unit variance, as SD's does;
2. the UNet and the CLIP text encoder together, epsilon prediction on the DDPM
   scaled-linear schedule (SD's), min-SNR weighting, 10% empty captions (for classifier-free
   guidance), AdamW, an EMA of both; latents of a fixed pool of scenes encoded once.
   ``--beta-schedule linear`` (DDPM's) and ``--lr-decay cosine`` are there for the position
   experiment (README): on a 16x16 latent, SD's last step keeps 7% of the signal, so the coarse
   layout shows through the noise at an SNR near 1 and a model can learn to read where things
   go from the starting noise instead of the caption; ``linear`` keeps 0.6%, and ``zero-snr``
   (with ``--prediction-type v_prediction``, Lin et al. 2024) none.
It finishes on a 2-core CPU (one thread: see ``benchmarks/RESULTS.md`` for the times), and
on a GPU when one is given (``--device cuda``). ``OUT`` gets a diffusers-layout folder (the
EMA weights, safetensors) and ``recipe.json``: the settings, the losses and the times. A
snapshot is written every ``--snapshot-every`` steps (atomically), so a fault loses little.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import tiny
from . import scenes
from .tokenizer import write_tokenizer

__all__ = ["Recipe", "scheduler_config", "unet_config", "vae_config", "text_encoder_config", "train", "main"]


@dataclass
class Recipe:
    seed: int = 0
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    steps: int = 2500             # the shipped model: the 2500-step snapshot of a 4000-step run (README)
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    lr_decay: str = "constant"    # (after warm-up) or "cosine"
    min_lr_ratio: float = 0.05    # the cosine decay ends at lr * this
    beta_schedule: str = "scaled_linear"  # SD's, "linear" (DDPM's) or "zero-snr" (see the module docstring)
    prediction_type: str = "epsilon"      # or "v_prediction" (needed by "zero-snr")
    ema_decay: float = 0.999
    snr_gamma: float = 5.0               # min-SNR weighting; 0: plain MSE
    caption_dropout: float = 0.1
    pool: int = 40000             # scenes whose latents stage 2 trains on
    target_latents: str = "sample"  # the VAE posterior's draws (the shipped model) or "mean" (see demo/variants.py)
    snapshot_every: int = 500
    levels: int = 3               # UNet resolutions: 16, 8, 4 (, 2) latent pixels
    vae_from: str = ""            # a trained model folder whose VAE to reuse (skips stage 1)
    log_every: int = 50
    device: str = "cpu"

    def __post_init__(self):
        """Every number, before any work: a bad one would surface an hour into a run."""
        from ..checks import positive_int

        for name in ("vae_steps", "vae_batch", "steps", "batch", "warmup", "pool", "snapshot_every", "log_every"):
            positive_int(getattr(self, name), name)
        for name in ("vae_lr", "lr"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name}: expected a finite number > 0, got {getattr(self, name)!r}")
        if not 0 <= self.snr_gamma < float("inf"):
            raise ValueError(f"snr_gamma: expected a finite number >= 0 (0: plain MSE), got {self.snr_gamma!r}")
        for name in ("kl_weight", "caption_dropout", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a number in [0, 1), got {getattr(self, name)!r}")
        if self.lr_decay not in ("cosine", "constant"):
            raise ValueError(f"lr_decay: expected 'cosine' or 'constant', got {self.lr_decay!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio!r}")
        if self.target_latents not in ("mean", "sample"):
            raise ValueError(f"target_latents: expected 'mean' or 'sample', got {self.target_latents!r}")
        if self.beta_schedule not in BETAS:
            raise ValueError(f"beta_schedule: expected one of {sorted(BETAS)}, got {self.beta_schedule!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type: expected 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        if self.beta_schedule == "zero-snr" and self.prediction_type != "v_prediction":
            raise ValueError("prediction_type: the zero-snr schedule needs 'v_prediction' (at zero SNR the noise "
                             "is the input itself and epsilon prediction has nothing to learn)")
        if self.levels not in (3, 4):
            raise ValueError(f"levels: expected 3 or 4, got {self.levels!r}")
        if self.vae_from and not (Path(self.vae_from) / "vae").is_dir():
            raise ValueError(f"vae_from: {self.vae_from} has no vae/ folder (expected a trained model folder)")


BETAS = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012), "zero-snr": (0.00085, 0.012)}


def scheduler_config(beta_schedule: str = "scaled_linear", prediction_type: str = "epsilon") -> dict:
    """The model folder's scheduler: SD1's PNDM config on the recipe's noise schedule; for
    "zero-snr", SD's schedule rescaled to zero terminal SNR with DDIM and trailing timesteps, as
    Lin et al. sample it (PNDM divides by the signal, which is 0 at the last step)."""
    start, end = BETAS[beta_schedule]
    betas = {"beta_start": start, "beta_end": end, "prediction_type": prediction_type}
    if beta_schedule == "zero-snr":
        return {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "steps_offset": 0,
                "set_alpha_to_one": False, "clip_sample": False, **betas}
    return {**tiny.scheduler_config("sd1"), "beta_schedule": beta_schedule, **betas}


def target_latents(moments: torch.Tensor, how: str, generator=None) -> torch.Tensor:
    """The unscaled latents a step trains on, from the VAE's posterior ``moments``: a draw
    (``"sample"``, as diffusers' scripts) or the mean (``"mean"``)."""
    from ..models.vae import DiagonalGaussian

    posterior = DiagonalGaussian(moments)
    return posterior.sample(generator) if how == "sample" else posterior.mode()


def lr_factor(r: Recipe, step: int) -> float:
    """Linear warm-up, then constant or a cosine decay to ``min_lr_ratio``."""
    if step < r.warmup:
        return (step + 1) / r.warmup
    if r.lr_decay == "constant":
        return 1.0
    done = min((step - r.warmup) / max(r.steps - r.warmup, 1), 1.0)
    return r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))


def unet_config(levels: int = 3) -> dict:
    """No attention at 16x16 (it costs most; the coarser levels place things)."""
    cfg = tiny.unet_config("sd1", sample_size=scenes.SIZE // 4, cross_attention_dim=64)
    cfg.update(block_out_channels=[32, 64, 128, 128][:levels], layers_per_block=1, norm_num_groups=16,
               attention_head_dim=8,
               down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1),
               up_block_types=["CrossAttnUpBlock2D"] * (levels - 1) + ["UpBlock2D"])
    return cfg


def vae_config(scaling_factor: float = 1.0) -> dict:
    cfg = tiny.vae_config(latent_factor=4, sample_size=scenes.SIZE)
    cfg.update(block_out_channels=[16, 32, 64], scaling_factor=scaling_factor)
    return cfg


def text_encoder_config(vocab: dict[str, int]) -> dict:
    cfg = tiny.text_encoder_config(hidden_size=64, layers=2, projection_dim=64)
    cfg.update(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
               pad_token_id=vocab["<|endoftext|>"])
    return cfg


def _images(rng: random.Random, n: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` training scenes as (n, 3, 64, 64) in [-1, 1] and their captions."""
    picked = [scenes.sample(rng) for _ in range(n)]
    x = np.stack([np.asarray(scenes.render(s), dtype=np.float32) for s in picked]) / 127.5 - 1
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), [s.caption() for s in picked]


class _Stage:
    """One optimisation step (clipped gradients, then the lr schedule) and the log: the mean
    loss of every ``log_every`` steps, with the seconds since the stage began."""

    def __init__(self, name: str, params, opt, sched, r: Recipe, steps: int, log: list):
        self.name, self.params, self.opt, self.sched, self.r, self.steps, self.log = \
            name, list(params), opt, sched, r, steps, log
        self.t0, self.running = time.perf_counter(), []

    def step(self, step: int, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.running.append(loss.item())
        if step % self.r.log_every == 0 or step == self.steps:
            self.log.append({"stage": self.name, "step": step, "loss": round(sum(self.running) / len(self.running), 5),
                             "seconds": round(time.perf_counter() - self.t0, 1)})
            print(json.dumps(self.log[-1]), flush=True)
            self.running = []


def train_vae(r: Recipe, log: list):
    from ..models.vae import AutoencoderKL

    torch.manual_seed(r.seed)
    rng = random.Random(f"vae-{r.seed}")
    vae = AutoencoderKL(vae_config()).to(r.device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / r.vae_steps, 1))))
    stage = _Stage("vae", vae.parameters(), opt, sched, r, r.vae_steps, log)
    for step in range(1, r.vae_steps + 1):
        x, _ = _images(rng, r.vae_batch)
        x = x.to(r.device)
        post = vae.encode(x)
        recon = vae.decode(post.sample())
        kl = 0.5 * (post.mean.pow(2) + post.var - 1 - post.logvar).sum(dim=(1, 2, 3)).mean()
        stage.step(step, torch.nn.functional.mse_loss(recon, x) + r.kl_weight * kl)
    vae.eval()
    with torch.no_grad():  # unit-variance latents, as SD's 0.18215 makes its VAE's
        x, _ = _images(random.Random(f"scale-{r.seed}"), 512)
        std = vae.encode(x.to(r.device)).mode().std().item()
    vae.config = type(vae.config).with_defaults(vae.config, {"scaling_factor": round(1 / std, 5)})
    return vae


def train_model(r: Recipe, vae, tokenizer, vocab: dict, log: list, snapshot=None):
    """Stage 2; ``snapshot(unet, text_encoder, step)`` is called every ``snapshot_every`` steps
    with the EMA weights in place (and the training weights restored after)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.unet import UNet2DConditionModel
    from ..schedulers import create
    from ..training.ema import EMA
    from ..training.objective import Objective
    from ..training.text import encode

    torch.manual_seed(r.seed + 1)
    te_cfg = text_encoder_config(vocab)
    te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in te_cfg.items() if k not in ("architectures", "model_type")}))
    unet = UNet2DConditionModel(unet_config(r.levels))
    te, unet = te.to(r.device).train(), unet.to(r.device).train()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(r, s))
    ema = EMA(params, decay=r.ema_decay)
    objective = Objective(create("ddpm", scheduler_config(r.beta_schedule, r.prediction_type)),
                          snr_gamma=r.snr_gamma or None)

    rng = random.Random(f"pool-{r.seed}")
    moments, captions = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, r.pool, 256):
            x, c = _images(rng, min(256, r.pool - start))
            moments.append(vae.encode(x.to(r.device)).parameters.cpu())
            captions += c
    moments = torch.cat(moments)
    print(f"encoded {len(captions)} scenes in {time.perf_counter() - t0:.0f} s", flush=True)

    stage = _Stage("model", params, opt, sched, r, r.steps, log)
    order = torch.Generator().manual_seed(r.seed + 2)
    for step in range(1, r.steps + 1):
        idx = torch.randint(0, len(captions), (r.batch,), generator=order)
        latents = target_latents(moments[idx].to(r.device), r.target_latents) * vae.config.scaling_factor
        text = ["" if rng.random() < r.caption_dropout else captions[i] for i in idx.tolist()]
        embeds, _ = encode([tokenizer], [te], text, sdxl=False)
        stage.step(step, objective(unet, latents, embeds))
        ema.update()
        if snapshot is not None and (step % r.snapshot_every == 0 or step == r.steps):
            saved = [p.detach().clone() for p in params]
            ema.copy_to()
            snapshot(unet, te, step)
            if step < r.steps:
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
    return unet.eval(), te.eval()


def save(folder: Path, unet, vae, te, tokenizer_dir: Path, extra: dict, scheduler: dict) -> Path:
    """The diffusers layout, filled in a temp folder and renamed (a fault keeps the last one)."""
    from ..training.checkpoint import atomic_folder
    from . import write_component, write_index

    def fill(tmp: Path) -> None:
        write_component(tmp / "unet", dict(unet.config), unet.state_dict(), "UNet2DConditionModel")
        write_component(tmp / "vae", dict(vae.config), vae.state_dict(), "AutoencoderKL")
        write_component(tmp / "text_encoder", None, te.state_dict(), "CLIPTextModel", te.config)
        (tmp / "tokenizer").mkdir()
        for f in tokenizer_dir.iterdir():
            (tmp / "tokenizer" / f.name).write_bytes(f.read_bytes())
        (tmp / "recipe.json").write_text(json.dumps(extra, indent=1))
        write_index(tmp, scheduler)

    return atomic_folder(Path(folder), fill)


def ship(src: Path, dst: Path, marker: str = "model_index.json") -> Path:
    """Copy a trained folder as the package ships it: weights in float16 (half the size; the
    pipeline loads them in the dtype asked for), everything else as it is."""
    from safetensors.torch import load_file, save_file

    from ..training.checkpoint import atomic_folder

    if not (Path(src) / marker).is_file():
        raise ValueError(f"ship: {src} is not a trained model folder (no {marker})")

    def fill(tmp: Path) -> None:
        for f in sorted(Path(src).rglob("*")):
            target = tmp / f.relative_to(src)
            if f.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif f.suffix == ".safetensors":
                save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()}, target,
                          metadata={"format": "pt"})
            else:
                target.write_bytes(f.read_bytes())

    return atomic_folder(Path(dst), fill)


def train(out: Path, r: Recipe) -> Path:
    out = Path(out)
    log: list = []
    start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="controldiff-tokenizer-")
    tok_dir = Path(tmp.name)
    vocab = write_tokenizer(tok_dir, scenes.WORDS)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    if r.vae_from:
        from ..pipeline import Pipeline

        vae = Pipeline.from_pretrained(r.vae_from, device=r.device, dtype=torch.float32).vae.eval()
    else:
        vae = train_vae(r, log)
    vae_seconds = time.perf_counter() - start

    def extra(step):
        return {"recipe": asdict(r), "step": step, "vae_seconds": round(vae_seconds),
                "seconds": round(time.perf_counter() - start), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "log": log}

    def snapshot(unet, te, step):
        save(out, unet, vae, te, tok_dir, extra(step), scheduler_config(r.beta_schedule, r.prediction_type))
        print(f"snapshot at step {step}: {out}", flush=True)

    with tmp:
        train_model(r, vae, tokenizer, vocab, log, snapshot)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m controldiff.demo.recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to write (replaced atomically at each snapshot)")
    p.add_argument("--ship", action="store_true",
                   help="instead of training, copy the trained OUT into the package (float16 weights)")
    defaults = Recipe()
    for name, value in asdict(defaults).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one per process on shared cores)")
    args = vars(p.parse_args(argv))
    torch.set_num_threads(args.pop("threads"))
    out = args.pop("out")
    try:
        if args.pop("ship"):
            from . import MODEL_DIR

            print(ship(out, MODEL_DIR))
            return 0
        recipe = Recipe(**args)
    except ValueError as e:
        p.error(str(e))
    train(out, recipe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
