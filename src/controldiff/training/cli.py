"""``controldiff train METHOD MODEL --data DIR --output DIR ...``: the command line of the
training library (``controldiff.cli`` adds it as a subcommand). Methods not implemented yet
are listed and refused with exit status 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import METHODS
from .lora import TEXT_TARGETS, UNET_TARGETS
from .trainer import FORMATS

__all__ = ["add_parser", "cmd_train"]


def _layers(text: str) -> tuple[str, ...]:
    """``to_q,to_v`` -> ("to_q", "to_v"): module names or endings of their dotted paths."""
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer names such as to_q,to_v, got {text!r}")
    return names


def add_parser(sub) -> None:
    from ..cli import _finite_float, _positive_int, _seed, _text

    t = sub.add_parser("train", help="fine-tune a model (METHOD: lora, dreambooth, ...)",
                       description="Train on a folder of images with optional same-name .txt captions. "
                                   "Checkpoints go to OUTPUT/checkpoint-STEP; Ctrl-C writes one and exits 130.")
    t.add_argument("method", choices=list(METHODS), metavar="METHOD",
                   help="one of: " + ", ".join(METHODS) + " (implemented: " +
                        ", ".join(k for k, v in METHODS.items() if v) + ")")
    t.add_argument("model", metavar="MODEL", type=Path, help="diffusers model folder")
    t.add_argument("--data", required=True, type=Path, metavar="DIR", help="folder of training images")
    t.add_argument("--output", required=True, type=Path, metavar="DIR", help="where weights and checkpoints go")
    t.add_argument("--prompt", type=_text, metavar="TEXT", help="caption of the images without a .txt file")
    t.add_argument("--resolution", type=_positive_int, default=512, metavar="N", help="training size (default 512)")
    t.add_argument("--steps", type=_positive_int, default=1000, metavar="N", help="optimisation steps (default 1000)")
    t.add_argument("--batch-size", type=_positive_int, default=1, metavar="N", dest="batch_size",
                   help="images per step and process (under torchrun/accelerate launch the global batch is "
                        "N times the processes, as diffusers' scripts; default 1)")
    t.add_argument("--gradient-accumulation", type=_positive_int, default=1, metavar="N",
                   dest="gradient_accumulation", help="batches per optimisation step (default 1)")
    t.add_argument("--lr", type=_finite_float, metavar="X",
                   help="learning rate (default: the method's script's, 5e-6 for dreambooth, 1e-5 for custom-diffusion; else 1e-4)")
    t.add_argument("--lr-scheduler", default="constant", dest="lr_scheduler",
                   choices=("constant", "constant_with_warmup", "linear", "cosine"))
    t.add_argument("--lr-warmup-steps", type=int, default=0, metavar="N", dest="lr_warmup_steps")
    t.add_argument("--text-encoder-lr", type=_finite_float, metavar="X", dest="text_encoder_lr",
                   help="learning rate of the text encoders' parameters (default: --lr)")
    t.add_argument("--adam-weight-decay-text-encoder", type=_finite_float, metavar="X",
                   dest="adam_weight_decay_text_encoder", help="their AdamW weight decay (default: the UNet's, 1e-2)")
    t.add_argument("--rank", type=_positive_int, default=4, metavar="R", help="LoRA rank (default 4)")
    t.add_argument("--alpha", type=_finite_float, metavar="A", help="LoRA alpha (default: the rank)")
    t.add_argument("--lora-layers", type=_layers, metavar="NAMES", dest="unet_targets", default=UNET_TARGETS,
                   help="LoRA: the UNet's Linear layers to adapt, by name ending, comma-separated (default "
                        f"{','.join(UNET_TARGETS)})")
    t.add_argument("--lora-text-layers", type=_layers, metavar="NAMES", dest="text_targets", default=TEXT_TARGETS,
                   help=f"LoRA: the text encoders' layers with --train-text-encoder (default {','.join(TEXT_TARGETS)})")
    t.add_argument("--seed", type=_seed, help="seed for a reproducible run")
    t.add_argument("--snr-gamma", type=_finite_float, metavar="G", dest="snr_gamma",
                   help="min-SNR loss weighting gamma (5.0 is usual; default off)")
    t.add_argument("--noise-offset", type=_finite_float, default=0.0, metavar="X", dest="noise_offset")
    t.add_argument("--center-crop", action="store_true", dest="center_crop", help="center crops (default random)")
    t.add_argument("--flip", action="store_true", help="random horizontal flips")
    t.add_argument("--cache-latents", action="store_true", dest="cache_latents",
                   help="encode each image once (needs --center-crop or --buckets, no --flip)")
    t.add_argument("--buckets", action="store_true", help="aspect-ratio buckets (kohya's): each image resized to "
                   "cover the size of about RESOLUTION^2 pixels nearest its ratio, center-cropped; one size a batch")
    t.add_argument("--bucket-step", type=_positive_int, default=64, metavar="N", dest="bucket_step",
                   help="bucket sides are multiples of N (default 64)")
    t.add_argument("--checkpoint-every", type=_positive_int, metavar="N", dest="checkpoint_every")
    t.add_argument("--resume", type=Path, metavar="DIR", help="a checkpoint, or an output folder (its latest)")
    t.add_argument("--train-text-encoder", action="store_true", dest="train_text_encoder",
                   help="also train the text encoder(s) (LoRA: adapters on them)")
    t.add_argument("--token", metavar="TOKEN", help="textual inversion: the new token, e.g. '<cat-toy>'")
    t.add_argument("--initializer-token", metavar="WORD", dest="initializer_token",
                   help="textual inversion, custom diffusion ('+'-separated): a word of one token whose embedding starts the new one")
    t.add_argument("--num-vectors", type=_positive_int, default=1, metavar="N", dest="num_vectors",
                   help="textual inversion: vectors of the token (default 1)")
    t.add_argument("--learnable-property", choices=("object", "style"), default="object", dest="learnable_property",
                   help="textual inversion: the caption templates of images without captions (default object)")
    t.add_argument("--modifier-token", metavar="TOKENS", dest="modifier_token",
                   help="custom diffusion: new token(s) learnt as embeddings, '+'-separated, e.g. '<new1>'")
    t.add_argument("--freeze-model", choices=("crossattn_kv", "crossattn"), default="crossattn_kv",
                   dest="freeze_model", help="custom diffusion: train the cross-attention k/v (default) or all of it")
    t.add_argument("--noaug", action="store_true",
                   help="custom diffusion: no random-scale augmentation (the script's --noaug): the whole image")
    t.add_argument("--class-data", type=Path, metavar="DIR", dest="class_data",
                   help="prior preservation: folder of class images (missing ones are generated into it)")
    t.add_argument("--class-prompt", type=_text, metavar="TEXT", dest="class_prompt",
                   help="prior preservation: the class images' prompt, e.g. 'a photo of a dog'")
    t.add_argument("--num-class-images", type=_positive_int, default=100, metavar="N", dest="num_class_images",
                   help="prior preservation: class images used (and generated up to; default 100)")
    t.add_argument("--prior-loss-weight", type=_finite_float, default=1.0, metavar="W", dest="prior_loss_weight",
                   help="prior preservation: weight of the class images' loss (default 1.0)")
    t.add_argument("--validation-prompt", type=_text, metavar="TEXT", dest="validation_prompt",
                   help="images of TEXT from the model being trained every --validation-every steps and at the "
                        "end, to OUTPUT/validation/step-STEP-K.png (seed + K)")
    t.add_argument("--validation-every", type=_positive_int, metavar="N", dest="validation_every")
    t.add_argument("--validation-images", type=_positive_int, default=4, metavar="K", dest="validation_images",
                   help="validation images each time (default 4)")
    t.add_argument("--ema", action="store_true",
                   help="save an exponential moving average of the trained weights (diffusers' EMAModel rule)")
    t.add_argument("--ema-decay", type=_finite_float, default=0.9999, metavar="X", dest="ema_decay",
                   help="the EMA's largest decay (default 0.9999)")
    t.add_argument("--gradient-checkpointing", action="store_true", dest="gradient_checkpointing",
                   help="recompute the UNet's activations in the backward pass: less memory, slower steps")
    t.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no", dest="mixed_precision",
                   help="frozen weights and forward passes in bf16 or fp16 (CUDA only); trained weights and "
                        "optimizer state stay float32 (default no)")
    t.add_argument("--use-8bit-adam", action="store_true", dest="use_8bit_adam",
                   help="bitsandbytes' 8-bit AdamW: a quarter of the optimizer's memory (needs controldiff[bnb])")
    t.add_argument("--format", choices=FORMATS, default="both", help="saved files: lora kohya|diffusers, dreambooth diffusers (OUTPUT/diffusers)|single-file "
                        "(OUTPUT/NAME.safetensors); default both")
    t.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    t.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")
    t.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from ..cli import UsageError, _device_and_dtype
    from . import checkpoint
    from .trainer import TrainConfig, train

    cls = METHODS[args.method]
    if cls is None:
        done = ", ".join(k for k, v in METHODS.items() if v)
        raise UsageError(f"argument METHOD: {args.method} is not implemented yet (implemented: {done})")
    if not args.model.is_dir():
        raise UsageError(f"argument MODEL: not a model folder: {args.model}")
    if hasattr(cls, "from_args"):  # a method with arguments of its own
        method = cls.from_args(args)
    else:
        method = cls(rank=args.rank, alpha=args.alpha, train_text_encoder=args.train_text_encoder,
                     unet_targets=args.unet_targets, text_targets=args.text_targets)
    names = ("data", "output", "prompt", "resolution", "steps", "batch_size", "gradient_accumulation", "lr",
             "lr_scheduler", "lr_warmup_steps", "seed", "snr_gamma", "noise_offset", "center_crop", "flip",
             "cache_latents", "checkpoint_every", "resume", "format", "progress", "class_data", "class_prompt",
             "num_class_images", "prior_loss_weight", "validation_prompt", "validation_every", "validation_images",
             "ema", "ema_decay", "gradient_checkpointing", "mixed_precision")
    names += ("text_encoder_lr", "adam_weight_decay_text_encoder", "buckets", "bucket_step", "use_8bit_adam")
    config = TrainConfig(**{n: getattr(args, n) for n in names})
    if config.lr is None:
        config.lr = getattr(cls, "lr", 1e-4)  # the method's reference script's default
    config.check()
    device, _ = _device_and_dtype(args.device, "float32")
    try:
        result = train(args.model, method, config, device=device)
    except KeyboardInterrupt:
        try:
            print(f"checkpoint: {checkpoint.find(config.output)} (resume with --resume {config.output})",
                  file=sys.stderr)
        except ValueError:
            pass
        raise
    for f in result.files:
        print(f)
    if result.losses and result.rank == 0:  # several processes: rank 0 reports
        print(f"steps {result.step}, last loss {result.losses[-1]:.4f}", file=sys.stderr)
    return 0
