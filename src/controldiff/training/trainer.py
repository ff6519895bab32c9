"""The training loop every method shares: methods differ only in what is trainable and
what is saved (``method.attach`` / ``method.save``); data, objective, optimizer, schedule,
checkpoints and resume are here, once.

Order of random draws (torch's global RNG after ``set_seed``), as diffusers' example
scripts: the method's init, then per epoch the data order, per example its crop/flip (within
an epoch the next batch is drawn before the step's own draws, as accelerate's data loader
draws one batch ahead), per step the VAE sample, the noise (and offset) and the timesteps.
With prior preservation (``training/prior.py``) each example is an instance and a class image.
On several processes (``training/distributed.py``) every rank makes these draws for the global
batch (``batch_size`` per process times the processes) and trains on its own rows.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..checks import positive_int
from ..noise import check_seed
from . import checkpoint as ckpt
from .batches import Batches
from .buckets import bucket_sizes, check_buckets, nearest_bucket
from .data import read_folder
from .distributed import Processes
from .latents import LatentCache, scale
from .objective import Objective
from .optim import adamw, check_8bit
from .precision import autocast, check_precision, hold_frozen, scaler
from .ema import EMA, PREFIX as EMA_PREFIX, check_decay
from .prior import Pairs, PriorObjective, check_prior, class_examples, class_images
from .schedule import SCHEDULES, lr_schedule
from .text import encode
from .transforms import BucketTransform, ImageTransform, load_rgb
from .validation import check_validation, validation_images

__all__ = ["TrainConfig", "TrainResult", "train", "FORMATS"]

FORMATS = ("kohya", "diffusers", "single-file", "both")  # each method writes some (``method.formats``)


@dataclass
class TrainConfig:
    """A run's settings; defaults as diffusers' LoRA scripts unless noted."""

    data: Path
    output: Path
    prompt: Optional[str] = None          # the caption of images without a .txt file
    resolution: int = 512
    steps: int = 1000
    batch_size: int = 1
    gradient_accumulation: int = 1
    lr: float = 1e-4                      # (the script's default is 5e-4)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    text_encoder_lr: Optional[float] = None  # text encoders' AdamW group (default: lr, adam_weight_decay)
    adam_weight_decay_text_encoder: Optional[float] = None
    max_grad_norm: Optional[float] = 1.0
    seed: Optional[int] = None
    snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    center_crop: bool = False
    flip: bool = False
    interpolation: str = "lanczos"
    cache_latents: bool = False
    buckets: bool = False                 # aspect-ratio buckets (training/buckets.py), sides multiples of:
    bucket_step: int = 64
    checkpoint_every: Optional[int] = None
    resume: Optional[Path] = None
    format: str = "both"
    progress: bool = True
    class_data: Optional[Path] = None     # prior preservation (training/prior.py): class images,
    class_prompt: Optional[str] = None    # made here where fewer than num_class_images
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    validation_prompt: Optional[str] = None  # images from the model being trained (training/validation.py)
    validation_every: Optional[int] = None   # steps, and at the end
    validation_images: int = 4
    ema: bool = False                     # save an exponential moving average (training/ema.py)
    ema_decay: float = 0.9999
    gradient_checkpointing: bool = False  # the UNet's blocks recompute activations in the backward pass
    mixed_precision: str = "no"           # bf16 | fp16 (CUDA): frozen weights and forward (training/precision.py)
    use_8bit_adam: bool = False           # bitsandbytes' AdamW8bit (training/optim.py)

    def check(self) -> None:
        """Every argument, before any file is read."""
        for name in ("resolution", "steps", "batch_size", "gradient_accumulation"):
            positive_int(getattr(self, name), name)
        if self.checkpoint_every is not None:
            positive_int(self.checkpoint_every, "checkpoint_every")
        if isinstance(self.lr_warmup_steps, bool) or not isinstance(self.lr_warmup_steps, int) \
                or self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps: expected an integer >= 0, got {self.lr_warmup_steps!r}")
        for name, low in (("lr", 0), ("adam_epsilon", 0), ("snr_gamma", 0), ("max_grad_norm", 0),
                          ("text_encoder_lr", 0)):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and low < v < float("inf")):
                raise ValueError(f"{name}: expected a finite number > {low}, got {v!r}")
        for name in ("adam_weight_decay", "noise_offset", "adam_weight_decay_text_encoder"):
            v = getattr(self, name)
            if name == "adam_weight_decay_text_encoder" and v is None:
                continue
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf")):
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a number in [0, 1), got {getattr(self, name)!r}")
        if self.lr_scheduler not in SCHEDULES:
            raise ValueError(f"lr_scheduler: expected one of {SCHEDULES}, got {self.lr_scheduler!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format: expected one of {FORMATS}, got {self.format!r}")
        if self.seed is not None:
            check_seed(self.seed)
        check_prior(self.class_data, self.class_prompt, self.num_class_images, self.prior_loss_weight)
        check_validation(self.validation_prompt, self.validation_every, self.validation_images)
        check_decay(self.ema_decay)
        check_precision(self.mixed_precision)
        check_8bit(self.use_8bit_adam)
        ImageTransform(self.resolution, interpolation=self.interpolation)
        if self.cache_latents and (self.flip or not (self.center_crop or self.buckets)):
            raise ValueError("cache_latents: needs deterministic images (center_crop=True or buckets, flip=False); "
                             "a cached latent would freeze one random crop or flip")
        if self.buckets:
            check_buckets(self.resolution, self.bucket_step)
            if self.class_data is not None:  # the scripts pair each instance with a class image in one batch
                raise ValueError("class_data: prior preservation is not supported with buckets (an instance and "
                                 "its class image would need one size); drop one of them")
        out = Path(self.output)
        if out.exists() and not out.is_dir():
            raise ValueError(f"output: {out} exists and is not a folder")


@dataclass
class TrainResult:
    losses: list = field(default_factory=list)   # one per optimisation step of this run
    files: list = field(default_factory=list)    # the saved weights
    step: int = 0
    checkpoint: Optional[Path] = None            # the last checkpoint written
    interrupted: bool = False
    rank: int = 0                                # of the process (several: only rank 0 saves files)


@contextmanager
def _uninterrupted():
    """Ctrl-C waits until the block is done (the optimizer update must not be cut in half)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = signal.signal(signal.SIGINT, lambda s, f: got.append(s))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if got:
        raise KeyboardInterrupt


def _roots(components) -> dict:
    names = ("text_encoder", "text_encoder_2")[:len(components.text_encoders)]
    return {"unet": components.unet, **dict(zip(names, components.text_encoders))}


class _Data:
    """Examples to (latents, captions, SDXL time ids) batches."""

    def __init__(self, examples, config: TrainConfig, vae, sdxl: bool, method=None):
        self.examples, self.vae, self.sdxl = examples, vae, sdxl
        self.caption = getattr(method, "caption", lambda e: e.caption)  # e.g. a template drawn per use
        self.own = getattr(method, "draw", None)  # (example, image) -> pixels, caption, mask, crop (Custom Diffusion)
        self.transform = method.transform(config, sdxl) if hasattr(method, "transform") else \
            ImageTransform(config.resolution, config.center_crop, config.flip, config.interpolation)
        self.sizes = None  # with buckets: each example's (width, height); their transform, not the method's
        if config.buckets:
            sizes = bucket_sizes(config.resolution, config.bucket_step)
            self.sizes = [sizes[b] for b in bucket_ids(examples, config)]
            self.transform = BucketTransform(config.resolution, flip=config.flip, interpolation=config.interpolation)
        self.cache = None
        if config.cache_latents:
            self.cache = LatentCache(vae, [self.transform(load_rgb(e.path), *self._size(i))[0]
                                           for i, e in enumerate(examples)])

    def _size(self, i: int) -> tuple:
        """The bucket transform's size argument for example ``i`` (none without buckets)."""
        return () if self.sizes is None else (self.sizes[i],)

    def draw(self, indices, stacked=None) -> tuple:
        """A batch's random part (crops, flips), drawn when the scripts' data
        loader draws it. ``indices``: examples in the order their transforms draw; ``stacked``:
        their positions in batch order (default: as drawn)."""
        r = self.transform.resolution
        time_ids = []
        images = []
        for i in indices:
            e = self.examples[i]
            if self.own is not None:  # the method's draw reports its crop
                images.append(self.own(e, load_rgb(e.path)))
                top, left = images[-1].crop
            elif self.sizes is not None:
                if self.cache is None:
                    x, (top, left) = self.transform(load_rgb(e.path), self.sizes[i])
                    images.append(x)
                else:
                    top, left = self.transform.crop_to(*e.size, self.sizes[i])
                time_ids.append([e.size[1], e.size[0], top, left, self.sizes[i][1], self.sizes[i][0]])
                continue
            elif self.cache is None:
                x, (top, left) = self.transform(load_rgb(e.path))
                images.append(x)
            else:
                w, h = self.transform.resized(*e.size)  # the cache holds center crops
                top, left = int(round((h - r) / 2.0)), int(round((w - r) / 2.0))
            w, h = e.size
            time_ids.append([h, w, top, left, r, r])
        if stacked is not None:
            indices, time_ids = [indices[k] for k in stacked], [time_ids[k] for k in stacked]
            images = [images[k] for k in stacked] if images else images
        return indices, images, time_ids

    def encode(self, drawn: tuple):
        """(latents, captions, SDXL time ids, the method's loss mask or None) of a drawn batch;
        the VAE sample is the step's."""
        indices, images, time_ids = drawn
        mask = None
        if self.own is not None:  # the method's draws
            captions, mask = [d.caption for d in images], torch.stack([d.mask for d in images]).to(self.vae.device)
            images = [d.pixels for d in images]
        else:  # captions draw from Python's RNG only (templates), so when used: a batch drawn ahead
            # again on resume must not draw them twice
            captions = [self.caption(self.examples[i]) for i in indices]
        if self.cache is not None:
            latents = self.cache.sample(indices)
        else:
            pixels = torch.stack(images).to(self.vae.device, self.vae.dtype)
            with torch.no_grad():
                latents = scale(self.vae, self.vae.encode(pixels).sample())
        time_ids = torch.tensor(time_ids, dtype=latents.dtype, device=latents.device) if self.sdxl else None
        return latents, captions, time_ids, mask


def bucket_ids(examples, config: TrainConfig) -> list[int]:
    """Each example's bucket (an index into ``bucket_sizes``)."""
    sizes = bucket_sizes(config.resolution, config.bucket_step)
    return [nearest_bucket(e.size, sizes) for e in examples]


def _param_groups(params, roots: dict, config: TrainConfig):
    """AdamW's groups: the UNet's (and the rest), then the text encoders' with their own lr and
    weight decay where set, as diffusers' ``train_dreambooth_lora_sdxl.py``; one group if not."""
    if config.text_encoder_lr is None and config.adam_weight_decay_text_encoder is None:
        return params
    inside = {id(p) for name, m in roots.items() if name != "unet" and m is not None for p in m.parameters()}
    text = [p for p in params if id(p) in inside]
    if not text:
        raise ValueError("text_encoder_lr, adam_weight_decay_text_encoder: this run trains no text encoder "
                         "parameters (pass train_text_encoder=True / --train-text-encoder)")
    te = {"params": text, "lr": config.text_encoder_lr if config.text_encoder_lr is not None else config.lr,
          "weight_decay": config.adam_weight_decay if config.adam_weight_decay_text_encoder is None
          else config.adam_weight_decay_text_encoder}
    rest = [p for p in params if id(p) not in inside]
    return ([{"params": rest}] if rest else []) + [te]


def train(model, method, config: TrainConfig, *, device="cpu", dtype=torch.float32) -> TrainResult:
    """Train ``method`` (e.g. :class:`~controldiff.training.lora.LoRA`) on the diffusers
    folder ``model`` with ``config``; save its weights in ``config.output`` and return the
    losses and files. Ctrl-C (KeyboardInterrupt) writes a checkpoint, then re-raises.
    Started by ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` > 1), the processes train
    as one process with their global batch would; only rank 0 writes files."""
    from ..loading.folder import load_components, read_configs
    from ..schedulers import create

    config.check()
    procs = Processes.from_env(device)
    device = procs.device
    check_precision(config.mixed_precision, device)
    read = getattr(method, "read_data", None)  # a method with data of its own (textual inversion's templates)
    examples = read(model, config) if read else read_folder(config.data, config.resolution, config.prompt)
    kinds = getattr(method, "formats", ("kohya", "diffusers"))  # the files the method writes
    if config.format != "both" and config.format not in kinds:
        raise ValueError(f"format: {method.name} saves {' or '.join(kinds)} (or both), got {config.format!r}")
    groups = bucket_ids(examples, config) if config.buckets else None  # each example's bucket
    pairs = Pairs(len(examples), config.num_class_images) if config.class_data is not None else None
    count = pairs.count if pairs else len(examples)  # the data set's length
    configs = read_configs(model)
    signature = ckpt.model_signature(configs)
    resumed = ckpt.read(config.resume) if config.resume is not None else None
    if resumed is not None:
        _check_resume(resumed, signature, method, count, config)
        if resumed.info["data"].get("groups") != groups:
            raise ValueError(f"resume: {config.resume} was trained " + ("with" if resumed.info["data"].get("groups")
                             else "without") + " buckets, or other ones; pass the buckets settings it was trained with")
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    if pairs is not None:  # before the seed: generation draws from its own generators
        with procs.main_first():  # rank 0 makes missing class images, the others find them
            class_images(model, config.class_data, config.class_prompt, config.num_class_images,
                         config.resolution, config.seed, device=device, dtype=dtype,
                         progress=config.progress and procs.main)
        examples += class_examples(config.class_data, config.class_prompt, config.num_class_images,
                                   config.resolution)

    seed = procs.shared_seed(config.seed)
    if seed is not None:
        ckpt.set_seed(seed)
    c = load_components(model, device=device, dtype=dtype)
    if hasattr(method, "bind"):  # a method that saves whole models (DreamBooth) sees every component
        method.bind(c)
    sdxl = c.info.family == "sdxl"
    roots = _roots(c)
    for m in roots.values():
        if m is not None:
            m.requires_grad_(False)
    c.vae.eval()
    params = method.attach(roots)
    for name, m in roots.items():
        if m is not None and (name == "unet" or method.train_text_encoder):
            m.train()
    c.unet.gradient_checkpointing = config.gradient_checkpointing
    if not hasattr(method, "bind"):  # a method saving whole models (DreamBooth) keeps them float32
        hold_frozen([c.vae, *roots.values()], config.mixed_precision)
    forward = lambda: autocast(config.mixed_precision, device)  # noqa: E731
    scale_loss = scaler(config.mixed_precision, device)
    optimizer = adamw(_param_groups(params, roots, config), config.use_8bit_adam, lr=config.lr,
                      betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                      eps=config.adam_epsilon)
    schedule = lr_schedule(optimizer, config.lr_scheduler, config.lr_warmup_steps, config.steps)
    objective = Objective(create("ddpm", c.scheduler_config), config.snr_gamma, config.noise_offset) \
        if pairs is None else PriorObjective(create("ddpm", c.scheduler_config), config.snr_gamma,
                                             config.noise_offset, config.prior_loss_weight)
    if hasattr(method, "objective"):  # a method with a loss of its own (Custom Diffusion's mask)
        objective = method.objective(objective)
    objective.target(torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))  # prediction type check
    batch_size = config.batch_size * procs.world  # the global batch
    batches = Batches(count, batch_size, groups=groups)
    step = 0
    ema = EMA(params, config.ema_decay) if config.ema else None
    if resumed is not None:
        averages = {k: v for k, v in resumed.trainable.items() if k.startswith(EMA_PREFIX)}
        method.load_state_dict({k: v for k, v in resumed.trainable.items() if k not in averages}, str(config.resume))
        if ema is not None:
            ema.load_state_dict(averages, resumed.step, str(config.resume))
        elif averages:
            raise ValueError(f"resume: {config.resume} holds an EMA of the weights (trained with ema=True); "
                             "pass ema=True (--ema) to continue it")
        optimizer.load_state_dict(resumed.optimizer)
        if resumed.scaler:  # an fp16 run's loss scale (none after other precisions: a fresh one)
            scale_loss.load_state_dict(resumed.scaler)
        schedule.load_state_dict(resumed.lr_scheduler)
        ckpt.set_rng_state(resumed.rng)
        d = resumed.info["data"]
        batches = Batches(count, batch_size, d["epoch"], d["order"], d["position"], groups)
        step = resumed.step
    data = _Data(examples, config, c.vae, sdxl, method)

    def fetch():
        indices = batches.next()
        return data.draw(*pairs(indices)) if pairs else data.draw(indices)

    # accelerate's data loader draws a batch ahead within an epoch (the next batch's crops come
    # before this step's noise); a checkpoint keeps the RNG and data state from before the batch
    # drawn ahead, so that a resumed run draws it again
    pending, ahead = None, None
    if resumed is not None and "ahead" in resumed.info["data"]:
        after = torch.get_rng_state()
        torch.set_rng_state(torch.tensor(resumed.info["data"]["ahead"], dtype=torch.uint8))
        if "ahead_numpy" in resumed.info["data"]:  # (checkpoints before it had none) drawn by data only:
            ckpt.set_numpy_state(resumed.info["data"]["ahead_numpy"])  # Custom Diffusion's scales
        ahead, pending = (torch.get_rng_state(), batches.state(), ckpt.numpy_state()), fetch()
        torch.set_rng_state(after)
    info = {"model": signature, "model_path": str(Path(model).resolve()), "method": method.describe(),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
            "processes": procs.world}
    frozen_text = not method.train_text_encoder
    text_cache: dict = {}

    def conditioning(captions):
        if not frozen_text:
            return encode(c.tokenizers, c.text_encoders, captions, sdxl)
        missing = [t for t in dict.fromkeys(captions) if t not in text_cache]
        if missing:
            with torch.no_grad():
                embeds, pooled = encode(c.tokenizers, c.text_encoders, missing, sdxl)
            for i, t in enumerate(missing):
                text_cache[t] = (embeds[i], None if pooled is None else pooled[i])
        embeds = torch.stack([text_cache[t][0] for t in captions])
        pooled = torch.stack([text_cache[t][1] for t in captions]) if sdxl else None
        return embeds, pooled

    def snapshot() -> ckpt.Checkpoint:
        state = batches.state() if ahead is None else dict(ahead[1], ahead=ahead[0].tolist(), ahead_numpy=ahead[2])
        trainable = method.state_dict() if ema is None else {**method.state_dict(), **ema.state_dict()}
        return ckpt.Checkpoint(step, trainable, optimizer.state_dict(), schedule.state_dict(),
                               ckpt.rng_state(), dict(info, data=state), scale_loss.state_dict())

    def validate():
        if config.validation_prompt is not None and procs.main:
            with forward():
                validation_images(c, config.validation_prompt, config.validation_images, config.resolution,
                                  config.seed, step, output, Path(model).name)

    from tqdm.auto import tqdm

    result = TrainResult(step=step, rank=procs.rank)
    start, boundary = step, snapshot()
    bar = tqdm(total=config.steps, initial=step, desc=method.name, disable=not (config.progress and procs.main))
    try:
        while step < config.steps:
            total = 0.0
            for micro in range(config.gradient_accumulation):
                drawn = pending if pending is not None else fetch()
                pending = ahead = None
                if batches.position < len(batches.order):  # more of this epoch: the next batch is drawn now
                    ahead = (torch.get_rng_state(), batches.state(), ckpt.numpy_state())
                    pending = fetch()
                with forward():
                    latents, captions, time_ids, mask = data.encode(drawn)
                if config.mixed_precision != "no":  # the noise and SDXL sizes as in float32
                    latents, time_ids = latents.float(), None if time_ids is None else time_ids.float()
                noise, timesteps = objective.sample(latents)
                rows = procs.rows(len(latents), config.batch_size, 2 if pairs else 1)
                share = 1.0  # of the global batch's mean loss
                if rows is not None:  # this rank's part of the global batch (none of a short last one)
                    share = len(rows) / len(latents)
                    if not rows:
                        continue
                    latents, noise, timesteps = latents[rows], noise[rows], timesteps[rows]
                    mask = mask[rows] if mask is not None else None
                    captions = [captions[i] for i in rows]
                    time_ids = time_ids[rows] if time_ids is not None else None
                with procs.local_rng(seed, step * config.gradient_accumulation + micro):
                    with forward():
                        embeds, pooled = conditioning(captions)
                        added = {"text_embeds": pooled, "time_ids": time_ids} if sdxl else None
                        loss = objective(c.unet, latents, embeds, added, noise=noise, timesteps=timesteps, mask=mask)
                    scale_loss.scale(loss * share / config.gradient_accumulation).backward()
                total += loss.item() * share / config.gradient_accumulation
            if procs.world > 1:  # the sums of the ranks' shares: the global batch's gradient and loss
                for p in params:
                    if p.grad is None:  # a rank without rows this step
                        p.grad = torch.zeros_like(p)
                summed = torch.tensor([total], dtype=torch.float64, device=device)
                procs.sum_([p.grad for p in params] + [summed])
                total = summed.item()
            with _uninterrupted():
                scale_loss.unscale_(optimizer)
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                scale_loss.step(optimizer)
                scale_loss.update()
                schedule.step()
                optimizer.zero_grad()
                if ema is not None:
                    ema.update()
                step += 1
                result.losses.append(total)
                result.step = step
                boundary = snapshot()
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and procs.main:
                result.checkpoint = ckpt.write(output, boundary)
            if config.validation_every and step % config.validation_every == 0 and step < config.steps:
                validate()
    except KeyboardInterrupt:
        bar.close()
        saved = start if result.checkpoint is None else int(result.checkpoint.name.split("-")[-1])
        if boundary.step > saved and procs.main:  # something trained since the last checkpoint
            result.checkpoint = ckpt.write(output, boundary)
        result.interrupted = True
        raise
    finally:
        bar.close()
    if ema is not None:  # what is saved (and shown at the end) is the average
        ema.copy_to()
    formats = kinds if config.format == "both" else (config.format,)
    result.files = method.save(output, formats, ckpt.atomic_file) if procs.main else []
    validate()
    return result


def _check_resume(resumed: ckpt.Checkpoint, signature: str, method, count: int, config: TrainConfig) -> None:
    where = f"resume: {config.resume}"
    if resumed.info.get("model") != signature:
        raise ValueError(f"{where} was trained on another model ({resumed.info.get('model_path')}, whose UNet/text "
                         "encoder configs differ from this model's)")
    if resumed.info.get("method") != method.describe():
        raise ValueError(f"{where} was trained with other settings ({resumed.info.get('method')}); "
                         f"this run has {method.describe()}")
    eight = resumed.info["config"].get("use_8bit_adam", False)
    if eight != config.use_8bit_adam:  # the optimizer's state would not fit
        raise ValueError(f"{where} was trained with use_8bit_adam={eight} (--use-8bit-adam); pass the same to "
                         "continue")
    if resumed.info["data"]["count"] != count:
        raise ValueError(f"{where} was trained on {resumed.info['data']['count']} images; {config.data} has {count}")
    if resumed.step >= config.steps:
        raise ValueError(f"steps: the checkpoint is at step {resumed.step}; pass more steps to continue")
