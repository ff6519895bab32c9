"""Variants of the embedded model, fine-tuned from it on the same scenes, so that the controls
that need their own model have a real one to run on:

- ``controlnet-edges`` / ``controlnet-positions``: ControlNets (a trainable copy of the UNet's
  encoder, zero convolutions, the UNet frozen) on the scenes' outline and silhouette maps;
- ``inpaint``: a 9-channel UNet (latents, mask, masked-image latents: SD's inpainting layout);
- ``instruct-pix2pix``: an 8-channel UNet (latents, source-image latents) trained on the
  scenes' edit pairs ("make the circle red"), with InstructPix2Pix's conditioning dropout.

    python -m controldiff.demo.variants KIND OUT [--steps N] [--base DIR] [--threads T]
    python -m controldiff.demo.variants KIND OUT --ship

Each is what the reference training script does (diffusers' ``train_controlnet.py``,
``train_instruct_pix2pix.py``, SD-inpainting's widened ``conv_in``), on latents of a pool of
scenes encoded once with the base VAE; the base text encoder and VAE stay frozen.

The 8- and 9-channel kinds do not learn to use their condition yet on a CPU's budget (the
weights of their new inputs stay near 0.007 against the first four's 0.09, and the pictures
do not copy the image): ``--conv-in-lr``, ``--target-latents mean`` and ``--weighting v`` are
the settings tried (README, "The embedded default model"); none is shipped. ``OUT`` is
written atomically every ``--snapshot-every`` steps (EMA weights), with ``recipe.json``.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..training.objective import Objective, compute_snr
from . import MODEL_DIR, scenes

__all__ = ["KINDS", "VariantRecipe", "controlnet_from_unet", "widened_unet", "train", "variant_path", "main"]

KINDS = ("controlnet-edges", "controlnet-positions", "inpaint", "instruct-pix2pix")
_PIPELINES = {"inpaint": "StableDiffusionInpaintPipeline", "instruct-pix2pix": "StableDiffusionInstructPix2PixPipeline"}


def variant_path(kind: str) -> Path:
    """The shipped folder of a variant: a ControlNet folder, or a whole model folder."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
    path = MODEL_DIR.parent / f"model-{kind}"
    if not (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"the demo variant {kind!r} is missing from {path}: make it with "
                                f"python -m controldiff.demo.variants {kind} OUT && "
                                f"python -m controldiff.demo.variants {kind} OUT --ship")
    return path


@dataclass
class VariantRecipe:
    kind: str
    base: str = ""                # the model folder to start from ("" = the shipped embedded model)
    init: str = ""                # a trained variant folder of this kind to go on from ("" = the base's weights)
    seed: int = 0
    steps: int = 600
    batch: int = 64
    lr: float = 3e-4
    conv_in_lr: float = 3e-3      # 8/9-channel: the widened conv_in, whose new inputs start at zero (at lr they stay near it)
    warmup: int = 50
    ema_decay: float = 0.995
    caption_dropout: float = 0.1  # ControlNet's paper drops half; the scenes' captions carry the layout too
    edit_dropout: float = 0.05    # InstructPix2Pix's conditioning_dropout_prob
    pool: int = 8000
    target_latents: str = "sample"  # a draw of the VAE posterior (the shipped ControlNets), or "mean"
    weighting: str = "min-snr"    # the loss's weights by noise level: min-SNR-5, or "v" (see VWeightedObjective)
    snapshot_every: int = 200
    log_every: int = 50
    device: str = "cpu"

    def __post_init__(self):
        from ..checks import positive_int

        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {list(KINDS)}, got {self.kind!r}")
        for name in ("steps", "batch", "warmup", "pool", "snapshot_every", "log_every"):
            positive_int(getattr(self, name), name)
        for name in ("lr", "conv_in_lr"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name}: expected a finite number > 0, got {getattr(self, name)!r}")
        if self.weighting not in ("min-snr", "v"):
            raise ValueError(f"weighting: expected 'min-snr' or 'v', got {self.weighting!r}")
        if self.target_latents not in ("mean", "sample"):
            raise ValueError(f"target_latents: expected 'mean' or 'sample', got {self.target_latents!r}")
        for name in ("ema_decay", "caption_dropout", "edit_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a number in [0, 1), got {getattr(self, name)!r}")
        if self.base and not (Path(self.base) / "model_index.json").is_file():
            raise ValueError(f"base: {self.base} is not a model folder (no model_index.json)")
        if self.init and not (Path(self.init) / "recipe.json").is_file():
            raise ValueError(f"init: {self.init} is not a trained variant folder (no recipe.json)")

    @property
    def base_dir(self) -> Path:
        return Path(self.base) if self.base else MODEL_DIR


# ----------------------------------------------------------------------------- models


def controlnet_from_unet(unet, conditioning_channels: int = 3):
    """diffusers' ``ControlNetModel.from_unet``: the encoder's weights copied, the zero convs
    (and the condition embedding's last conv) zero, so training starts from the base model."""
    from ..models.controlnet import ControlNetModel

    u = unet.config
    cfg = {k: u[k] for k in ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
                             "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor",
                             "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim",
                             "use_linear_projection", "upcast_attention")}
    # two stride-2 convs: the condition image (64x64) down to the latent's 16x16 (the VAE's factor 4)
    cfg.update(conditioning_channels=conditioning_channels, conditioning_embedding_out_channels=[16, 32, 64])
    cn = ControlNetModel(cfg)
    own = cn.state_dict()
    copied = {k: v for k, v in unet.state_dict().items() if k in own and own[k].shape == v.shape}
    cn.load_state_dict(copied, strict=False)
    with torch.no_grad():
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            conv.weight.zero_()
            conv.bias.zero_()
    return cn


def widened_unet(unet, in_channels: int):
    """The UNet with ``in_channels`` inputs: the first 4 weights of ``conv_in`` kept, the new
    ones zero (so it starts as the base model), as SD-inpainting and InstructPix2Pix do."""
    from ..models.unet import UNet2DConditionModel

    wide = UNet2DConditionModel({**dict(unet.config), "in_channels": in_channels})
    state = dict(unet.state_dict())
    old = state.pop("conv_in.weight")
    weight = torch.zeros(old.shape[0], in_channels, *old.shape[2:], dtype=old.dtype)
    weight[:, :old.shape[1]] = old
    wide.load_state_dict({**state, "conv_in.weight": weight})
    return wide


# ----------------------------------------------------------------------------- data


def _pixels(images) -> torch.Tensor:
    x = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _inpaint_mask(rng: random.Random, scene: scenes.Scene) -> np.ndarray:
    """A training mask, 1 = repaint: a box around one object (the use the measurement makes),
    a random box, or everything (so the model can also start from nothing)."""
    m = np.zeros((scenes.SIZE, scenes.SIZE), np.float32)
    kind = rng.random()
    if kind < 0.15:
        m[:] = 1
        return m
    if kind < 0.6:
        cx, cy = scenes.POSITIONS[rng.choice(scene.things).position]
        h = rng.randint(9, 16)
    else:
        cx, cy, h = rng.randint(8, 56), rng.randint(8, 56), rng.randint(6, 20)
    m[max(cy - h, 0):cy + h, max(cx - h, 0):cx + h] = 1
    return m


def _pool(r: VariantRecipe, vae) -> dict:
    """The pool's latent moments (target), the extra inputs per kind, and the captions."""
    rng = random.Random(f"{r.kind}-{r.seed}")
    moments, extra, captions = [], [], []
    with torch.no_grad():
        for start in range(0, r.pool, 256):
            n = min(256, r.pool - start)
            picked = [scenes.sample(rng) for _ in range(n)]
            if r.kind == "instruct-pix2pix":
                edits = [scenes.edit(rng, s) for s in picked]
                target = _pixels(scenes.render(e) for _, e in edits)
                source = _pixels(scenes.render(s) for s in picked)
                extra.append(vae.encode(source.to(r.device)).mode().cpu())  # unscaled, as the pipeline's
                captions += [text for text, _ in edits]
            else:
                target = _pixels(scenes.render(s) for s in picked)
                captions += [s.caption() for s in picked]
                if r.kind == "inpaint":
                    mask = torch.from_numpy(np.stack([_inpaint_mask(rng, s) for s in picked]))[:, None]
                    masked = vae.encode((target * (mask < 0.5)).to(r.device)).parameters.cpu()
                    extra.append((mask, masked))
                else:
                    draw = scenes.edge_map if r.kind == "controlnet-edges" else scenes.position_map
                    extra.append(torch.from_numpy(np.stack([np.asarray(draw(s))[..., 0] for s in picked])))
            moments.append(vae.encode(target.to(r.device)).parameters.cpu())
    if r.kind == "inpaint":
        extra = (torch.cat([m for m, _ in extra]), torch.cat([x for _, x in extra]))
    else:
        extra = torch.cat(extra)
    return {"moments": torch.cat(moments), "extra": extra, "captions": captions}


# ----------------------------------------------------------------------------- training


def _model_fn(r: VariantRecipe, trainable, unet, extra, idx, scale: float, gen: torch.Generator):
    """``f(noisy, t, embeds)`` for the objective: the variant's UNet call for batch ``idx``."""
    from ..models.vae import DiagonalGaussian

    if r.kind.startswith("controlnet"):
        cond = (extra[idx].float() / 255).to(r.device)[:, None].expand(-1, 3, -1, -1)

        def f(x, t, e, added_cond_kwargs=None):
            down, mid = trainable(x, t, e, cond)
            return unet(x, t, e, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        return f
    if r.kind == "inpaint":
        mask, masked = extra
        small = torch.nn.functional.interpolate(mask[idx], size=masked.shape[-2:]).to(r.device)
        masked_latents = DiagonalGaussian(masked[idx].to(r.device)).sample(gen) * scale
        concat = torch.cat([small, masked_latents], dim=1)
    else:
        concat = extra[idx].to(r.device)
        p = r.edit_dropout  # as train_instruct_pix2pix.py: the image dropped for p <= u < 3p
        u = torch.rand(len(idx), generator=gen)
        concat = concat * (1 - ((u >= p) & (u < 3 * p)).float()).view(-1, 1, 1, 1).to(r.device)

    def f(x, t, e, added_cond_kwargs=None):
        return trainable(torch.cat([x, concat], dim=1), t, e)
    return f


def optimizer(r: VariantRecipe, trainable) -> torch.optim.AdamW:
    """AdamW at ``lr``; a widened UNet's ``conv_in`` at ``conv_in_lr`` (its new inputs start at zero)."""
    first = [] if r.kind.startswith("controlnet") else list(trainable.conv_in.parameters())
    rest = [p for p in trainable.parameters() if all(p is not q for q in first)]
    return torch.optim.AdamW([{"params": rest}, {"params": first, "lr": r.conv_in_lr}], lr=r.lr, weight_decay=1e-2)


class VWeightedObjective(Objective):
    """The epsilon loss weighted by ``1 + 1/SNR``: what a v-prediction model's loss weighs.
    min-SNR keeps the weight at 1 where the noise dominates, which leaves the x0 error there
    (the layout, what copying the condition fixes) at SNR times its size: 0.005 at the last
    step of SD's schedule."""

    def loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        snr = compute_snr(self.scheduler.alphas_cumprod, timesteps)
        per = (pred.float() - target.float()).pow(2).mean(dim=list(range(1, pred.ndim)))
        return (per * (1 + 1 / snr)).mean()


def train(out: Path, r: VariantRecipe, snapshot=None) -> Path:
    """Fine-tune the variant; ``OUT`` holds its EMA weights after every snapshot."""
    from transformers import CLIPTokenizer

    from ..pipeline import Pipeline
    from ..schedulers import create
    from ..training.ema import EMA
    from ..training.text import encode
    from .recipe import _Stage, target_latents

    start = time.perf_counter()
    base = Pipeline.from_pretrained(r.base_dir, device=r.device, dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(r.base_dir / "tokenizer")
    te, vae, unet = base.text_encoders[0].eval(), base.vae.eval(), base.unet.eval()
    for p in [*te.parameters(), *vae.parameters(), *unet.parameters()]:
        p.requires_grad_(False)
    torch.manual_seed(r.seed)
    if r.kind.startswith("controlnet"):
        trainable = controlnet_from_unet(unet)
    else:
        trainable = widened_unet(unet, 9 if r.kind == "inpaint" else 8)
    if r.init:
        trainable.load_state_dict(_load_variant(Path(r.init), r.kind))
    trainable = trainable.to(r.device).train()
    params = [p for p in trainable.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = optimizer(r, trainable)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / r.warmup))
    ema = EMA(params, decay=r.ema_decay)
    objective = (VWeightedObjective if r.weighting == "v" else Objective)(create("ddpm", base.scheduler_config),
                                                                         snr_gamma=5.0)

    t0 = time.perf_counter()
    pool = _pool(r, vae)
    log: list = []
    print(f"encoded {len(pool['captions'])} scenes in {time.perf_counter() - t0:.0f} s", flush=True)
    stage = _Stage(r.kind, params, opt, sched, r, r.steps, log)
    gen = torch.Generator().manual_seed(r.seed + 1)
    rng = random.Random(f"captions-{r.seed}")
    scale = vae.config.scaling_factor
    for step in range(1, r.steps + 1):
        idx = torch.randint(0, len(pool["captions"]), (r.batch,), generator=gen)
        latents = target_latents(pool["moments"][idx].to(r.device), r.target_latents, gen) * scale
        drop = 2 * r.edit_dropout if r.kind == "instruct-pix2pix" else r.caption_dropout
        text = ["" if rng.random() < drop else pool["captions"][i] for i in idx.tolist()]
        with torch.no_grad():
            embeds, _ = encode([tokenizer], [te], text, sdxl=False)
        f = _model_fn(r, trainable, unet, pool["extra"], idx, scale, gen)
        stage.step(step, objective(f, latents, embeds))
        ema.update()
        if step % r.snapshot_every == 0 or step == r.steps:
            saved = [p.detach().clone() for p in params]
            ema.copy_to()
            save(Path(out), trainable, r, {"recipe": asdict(r), "step": step, "log": log, "torch": torch.__version__,
                                            "threads": torch.get_num_threads(),
                                            "seconds": round(time.perf_counter() - start)})
            print(f"snapshot at step {step}: {out}", flush=True)
            if snapshot is not None:
                snapshot(step)
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
    return Path(out)


def _load_variant(folder: Path, kind: str) -> dict:
    from safetensors.torch import load_file

    made = json.loads((folder / "recipe.json").read_text())["recipe"]["kind"]
    if made != kind:
        raise ValueError(f"init: {folder} holds a {made} variant, not {kind}")
    weights = folder if kind.startswith("controlnet") else folder / "unet"
    return {k: v.float() for k, v in load_file(weights / "diffusion_pytorch_model.safetensors").items()}


def save(folder: Path, model, r: VariantRecipe, extra: dict) -> Path:
    """A ControlNet folder (``config.json`` + weights), or the base folder with this UNet."""
    from ..training.checkpoint import atomic_folder
    from . import write_component

    def fill(tmp: Path) -> None:
        if r.kind.startswith("controlnet"):
            tmp.rmdir()
            write_component(tmp, dict(model.config), model.state_dict(), "ControlNetModel")
        else:
            for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
                shutil.copytree(r.base_dir / part, tmp / part)
            write_component(tmp / "unet", dict(model.config), model.state_dict(), "UNet2DConditionModel")
            index = json.loads((r.base_dir / "model_index.json").read_text())
            (tmp / "model_index.json").write_text(json.dumps({**index, "_class_name": _PIPELINES[r.kind]}, indent=2))
        (tmp / "recipe.json").write_text(json.dumps(extra, indent=1))

    return atomic_folder(Path(folder), fill)


def ship(src: Path, kind: str) -> Path:
    """Copy a trained variant into the package (float16 weights), beside the base model."""
    from .recipe import ship as ship_folder

    marker = "config.json" if kind.startswith("controlnet") else "model_index.json"
    return ship_folder(Path(src), MODEL_DIR.parent / f"model-{kind}", marker=marker)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m controldiff.demo.variants", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=KINDS)
    p.add_argument("out", type=Path, help="folder to write (replaced atomically at each snapshot)")
    p.add_argument("--ship", action="store_true", help="instead of training, copy the trained OUT into the package")
    for name, value in asdict(VariantRecipe(kind=KINDS[0])).items():
        if name != "kind":
            p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one per process on shared cores)")
    args = vars(p.parse_args(argv))
    torch.set_num_threads(args.pop("threads"))
    out = args.pop("out")
    try:
        if args.pop("ship"):
            print(ship(out, args["kind"]))
            return 0
        recipe = VariantRecipe(**args)
    except ValueError as e:
        p.error(str(e))
    train(out, recipe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
