"""The ``controldiff`` command line: ``generate`` images and show model ``info``.

Library errors (ValueError, FileNotFoundError, ...) are shown as one line,
``controldiff: error: <message>``, with exit status 2 like argparse's own errors:
they are the user's input problems, and a traceback would bury the message.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import secrets
import signal
import struct
import sys
import threading
import time
from pathlib import Path

PROG = "controldiff"
_EXIT_USAGE, _EXIT_INTERRUPTED = 2, 130


class UsageError(Exception):
    """A bad command-line value found after parsing (reported like argparse's errors)."""


def scheduler_names() -> tuple[str, ...]:
    from .schedulers import NAMES

    return tuple(NAMES)


# ----------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63), got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Controlled generation with Stable Diffusion-family models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser("generate", help="generate images from a prompt (txt2img, img2img, inpainting)",
                       description="Generate images. Without MODEL, uses the built-in demo model (random weights).")
    g.add_argument("model", nargs="?", metavar="MODEL",
                   help="diffusers model folder or single-file checkpoint (default: the demo model)")
    g.add_argument("--prompt", "-p", default="", help="what to draw")
    g.add_argument("--negative", "-n", default=None, metavar="TEXT", help="negative prompt")
    g.add_argument("--width", type=_positive_int, help="image width in pixels (default: the model's)")
    g.add_argument("--height", type=_positive_int, help="image height in pixels (default: the model's)")
    g.add_argument("--steps", type=_positive_int, default=20, help="sampling steps (default: 20)")
    g.add_argument("--guidance", "--cfg", type=float, default=7.5, dest="guidance",
                   help="classifier-free guidance scale; <= 1 disables it (default: 7.5)")
    g.add_argument("--scheduler", choices=scheduler_names(), metavar="NAME",
                   help="one of: " + ", ".join(scheduler_names()) + " (default: the model folder's)")
    g.add_argument("--seed", type=_seed, help="random seed (default: a random one, printed and saved in the PNG)")
    g.add_argument("--num-images", "--n", type=_positive_int, default=1, dest="num_images", metavar="N",
                   help="number of images; image i uses seed + i (default: 1)")
    g.add_argument("--image", type=Path, metavar="PATH", help="init image (img2img, or inpainting with --mask)")
    g.add_argument("--mask", type=Path, metavar="PATH", help="inpainting mask, white = repaint (needs --image)")
    g.add_argument("--strength", type=float, help="how much to change --image, in (0, 1] (default: 0.8, inpaint 1.0)")
    g.add_argument("--out", "-o", metavar="PATH",
                   help="output PNG, or a folder for numbered files (default: outputs/NNNNN-SEED.png)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="LoRA file (kohya or peft/diffusers), repeatable; weight default 1.0")
    g.add_argument("--embedding", action="append", default=[], metavar="PATH[:TOKEN]",
                   help="textual inversion embedding, repeatable; token default: from the file")
    g.add_argument("--prompt-syntax", choices=("a1111", "compel", "none"), default="a1111",
                   help="prompt weighting syntax: (word:1.2) / word+ / plain (default: a1111)")
    g.add_argument("--clip-skip", type=_positive_int, metavar="N", help="skip the last N text encoder layers")
    g.add_argument("--controlnet", action="append", default=[], metavar="PATH:IMAGE[:SCALE]",
                   help="ControlNet folder (or file) and its control image, repeatable")
    g.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="weights dtype (default: float16 on cuda, float32 on cpu)")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="show a model folder's family, kind and sizes",
                       description="Show what a model folder holds, read from its configs and weight headers.")
    i.add_argument("model", metavar="MODEL", help="diffusers model folder or single-file checkpoint")
    i.set_defaults(func=cmd_info)
    return parser


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and the message
        return int(e.code or 0)
    try:
        return args.func(args)
    except UsageError as e:
        sub = f"{PROG} {args.command}"
        print(f"{sub}: error: {e}", file=sys.stderr)
        return _EXIT_USAGE
    except (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return _EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED


# ----------------------------------------------------------------------------- generate


def _device_and_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"argument --device: not a torch device: {device!r}") from None
    if dtype == "auto":
        dtype = "float16" if dev.type == "cuda" else "float32"
    return dev, getattr(torch, dtype)


def _model_path(model: str | None) -> tuple[Path, bool]:
    """The folder to load and whether it is the demo model."""
    if model is None:
        from .demo import default_model_path

        return default_model_path(), True
    path = Path(model).expanduser()
    if not path.exists():
        raise UsageError(f"argument MODEL: model folder or file not found: {path}")
    return path, False


def _check_args(args) -> None:
    if args.mask is not None and args.image is None:
        raise UsageError("argument --mask: inpainting also needs --image")
    if args.strength is not None:
        if args.image is None:
            raise UsageError("argument --strength: only meaningful with --image")
        if not 0.0 < args.strength <= 1.0:
            raise UsageError(f"argument --strength: expected a value in (0, 1], got {args.strength}")
    for flag, path in (("--image", args.image), ("--mask", args.mask)):
        if path is not None and not path.is_file():
            raise UsageError(f"argument {flag}: file not found: {path}")
    out = Path(args.out) if args.out is not None else None
    if out is not None and out.suffix and out.suffix.lower() != ".png" and not out.is_dir():
        raise UsageError(f"argument --out: only PNG output is supported, got {args.out}")


def _check_size(args, factor: int) -> None:
    for flag, v in (("--width", args.width), ("--height", args.height)):
        if v is not None and v % factor:
            raise UsageError(f"argument {flag}: {v} is not a multiple of {factor} (this model's latent factor); "
                             f"try {max(factor, v - v % factor)}")


def output_paths(out: str | Path | None, seeds: list[int]) -> list[Path]:
    """Where the images go. A file path is used as given (``name-1.png``, ... for several);
    a folder (default ``outputs/``) gets ``NNNNN-SEED.png``, numbered after the highest
    number already there, so earlier images are never overwritten."""
    as_folder = out is None or str(out).endswith(("/", "\\")) or Path(out).is_dir()
    if not as_folder:
        out = Path(out)
        out = out if out.suffix else out.with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        if len(seeds) == 1:
            return [out]
        return [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(len(seeds))]
    folder = Path(out) if out is not None else Path("outputs")
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := re.match(r"(\d+)-", p.name))]
    n = max(numbers, default=-1) + 1
    paths = []
    for seed in seeds:
        while any(p.name.startswith(f"{n:05d}-") for p in paths) or list(folder.glob(f"{n:05d}-*")):
            n += 1
        paths.append(folder / f"{n:05d}-{seed}.png")
        n += 1
    return paths


class _Cancel:
    """Ctrl-C stops sampling at the end of the current step (the callback returns False);
    a second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __call__(self, i, t, latents):
        return not self.requested

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{PROG}: stopping after this step (Ctrl-C again to abort)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def cmd_generate(args) -> int:
    import torch

    from .pipeline import Pipeline
    from .png import format_parameters, save_png

    _check_args(args)
    image = _open_image(args.image, "--image", "RGB")
    mask = _open_image(args.mask, "--mask", "L")
    device, dtype = _device_and_dtype(args.device, args.dtype)
    path, is_demo = _model_path(args.model)
    if is_demo:
        from .demo import DEMO_NOTICE

        print(DEMO_NOTICE)

    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(path, device=device, dtype=dtype)
    print(f"Loaded {path} ({pipe.info.family}, {pipe.info.kind}) in {time.perf_counter() - t0:.1f} s")
    _check_size(args, pipe.info.latent_factor)
    pipe.prompt_syntax = args.prompt_syntax
    extra_params = _load_extras(pipe, args)
    controls = _controls(args, device, dtype)

    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    seeds = [seed + i for i in range(args.num_images)]
    if args.seed is None:
        print(f"Seed: {seed}")
    sampler = args.scheduler or _folder_scheduler_name(pipe.scheduler_config)
    extra = {}
    if image is not None:
        extra["Denoising strength"] = args.strength if args.strength is not None else (1.0 if mask is not None else 0.8)
        extra["Mode"] = "inpaint" if mask is not None else "img2img"
    extra.update(extra_params)
    extra["Version"] = f"controldiff {_version()}"
    model_name = "demo (random weights)" if is_demo else path.resolve().name
    paths = output_paths(args.out, seeds)

    # One image at a time, each saved as soon as it is done: Ctrl-C loses only the image in
    # progress. Each has its own CPU generator, so image i is remade alone with --seed SEED+i.
    cancel = _Cancel()
    t1 = time.perf_counter()
    saved = 0
    with cancel:
        for s, p in zip(seeds, paths):
            out = pipe(args.prompt, negative_prompt=args.negative, height=args.height, width=args.width,
                       num_inference_steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
                       generator=torch.Generator("cpu").manual_seed(s), image=image, strength=args.strength,
                       mask_image=mask, output_type="pil", callback=cancel, controls=controls,
                       clip_skip=args.clip_skip)
            if out.cancelled or cancel.requested:
                done = out.steps_done
                print(f"{PROG}: cancelled after {done} step{'s' * (done != 1)} of image {saved + 1}; "
                      f"{saved} finished image{'s' * (saved != 1)} kept", file=sys.stderr)
                return _EXIT_INTERRUPTED
            img = out.images[0]
            text = format_parameters(args.prompt, args.negative, args.steps, sampler, args.guidance, s,
                                     img.width, img.height, model_name, extra)
            save_png(img, p, text)
            saved += 1
            print(p)
    elapsed = time.perf_counter() - t1
    print(f"Generated {saved} image{'s' * (saved != 1)} in {elapsed:.1f} s "
          f"({elapsed / (args.steps * saved):.2f} s/step)")
    return 0


def _split_suffix(value: str, flag: str, convert):
    """"PATH:SUFFIX" -> (Path, converted suffix or None); a path may itself contain ':'."""
    path, sep, tail = value.rpartition(":")
    if sep and path and not Path(value).exists():
        try:
            return Path(path), convert(tail)
        except ValueError:
            raise UsageError(f"argument {flag}: cannot read {tail!r} in {value!r}") from None
    return Path(value), None


def _load_extras(pipe, args) -> dict:
    """LoRAs and embeddings from the command line; what the PNG should record of them."""
    loras, tokens = [], []
    for value in args.lora:
        path, weight = _split_suffix(value, "--lora", float)
        if not path.exists():
            raise UsageError(f"argument --lora: file not found: {path}")
        name = pipe.load_lora(path, weight=1.0 if weight is None else weight)
        loras.append(f"{name}:{1.0 if weight is None else weight:g}")
    for value in args.embedding:
        path, token = _split_suffix(value, "--embedding", str)
        if not path.exists():
            raise UsageError(f"argument --embedding: file not found: {path}")
        tokens += pipe.load_textual_inversion(path, token=token)
    params = {}
    if loras:
        params["Lora"] = " ".join(loras)
    if tokens:
        params["TI"] = " ".join(tokens)
    if args.prompt_syntax != "a1111":
        params["Prompt syntax"] = args.prompt_syntax
    if args.clip_skip:
        params["Clip skip"] = args.clip_skip
    return params


def _controls(args, device, dtype) -> list:
    """ControlNets from --controlnet PATH:IMAGE[:SCALE]."""
    from .controls.controlnet import ControlNet
    from .loading.control_models import load_controlnet

    out = []
    for value in args.controlnet:
        parts = value.split(":")
        if len(parts) not in (2, 3):
            raise UsageError(f"argument --controlnet: expected PATH:IMAGE[:SCALE], got {value!r}")
        scale = 1.0
        if len(parts) == 3:
            try:
                scale = float(parts[2])
            except ValueError:
                raise UsageError(f"argument --controlnet: scale {parts[2]!r} is not a number") from None
        model_path, image_path = Path(parts[0]), Path(parts[1])
        for what, p in (("model", model_path), ("image", image_path)):
            if not p.exists():
                raise UsageError(f"argument --controlnet: {what} not found: {p}")
        model = load_controlnet(model_path, device=device, dtype=dtype)
        out.append(ControlNet(model, _open_image(image_path, "--controlnet", "RGB"), scale=scale))
    return out


def _open_image(path: Path | None, flag: str, mode: str):
    from PIL import Image

    if path is None:
        return None
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except OSError as e:  # includes PIL's UnidentifiedImageError
        raise UsageError(f"argument {flag}: cannot read {path} as an image ({e})") from None


def _folder_scheduler_name(config: dict) -> str:
    """Our name for the model folder's own scheduler (what the PNG's "Sampler" says)."""
    from .schedulers import CLASS_NAMES

    cls = config.get("_class_name", "?")
    name = CLASS_NAMES.get(cls, cls)
    return name + "_karras" if name == "dpmpp_2m" and config.get("use_karras_sigmas") else name


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("controldiff")
    except Exception:  # not installed (running from a source tree)
        return "dev"


# ----------------------------------------------------------------------------- info

_FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                 "F8_E4M3": "float8_e4m3", "F8_E5M2": "float8_e5m2"}


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def weights_summary(files: list[Path]) -> tuple[int, str]:
    """(parameter count, stored dtype(s)) of a component's weight files.

    Safetensors: from the headers alone, so even an SDXL folder is summarised in
    milliseconds; pickles are loaded safely. Integer tensors (position ids) are not parameters.
    """
    count, dtypes = 0, set()
    for f in files:
        if f.suffix == ".safetensors":
            for entry in _safetensors_header(f).values():
                if entry["dtype"] in _FLOAT_DTYPES:
                    count += math.prod(entry["shape"])
                    dtypes.add(_FLOAT_DTYPES[entry["dtype"]])
        else:
            from .loading.weights import load_state_dict

            for t in load_state_dict(f).values():
                if t.is_floating_point():
                    count += t.numel()
                    dtypes.add(str(t.dtype).removeprefix("torch."))
    return count, "/".join(sorted(dtypes))


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _info_single_file(path: Path) -> int:
    """info for a single-file checkpoint: loaded on the meta device, counted, nothing computed."""
    from .pipeline import Pipeline

    pipe = Pipeline.from_single_file(path)
    info = pipe.info
    h, w = pipe.default_size
    rows = [("model", str(path)), ("family", info.family + (" (refiner)" if info.refiner else "")),
            ("kind", f"{info.kind} (unet in_channels={info.in_channels})"),
            ("prediction type", info.prediction_type), ("default size", f"{w}x{h}"),
            ("latent factor", str(info.latent_factor)), ("scheduler", pipe.scheduler_config.get("_class_name", "?"))]
    total = 0
    parts = [("unet", pipe.unet), ("vae", pipe.vae)] + [(f"text_encoder{'_2' * i}", te)
                                                          for i, te in enumerate(pipe.text_encoders) if te is not None]
    for name, module in parts:
        count = sum(p.numel() for p in module.parameters())
        total += count
        rows.append((f"{name} parameters", f"{count:,} ({_human(count)}, {next(module.parameters()).dtype})"))
    rows.append(("total parameters", f"{total:,} ({_human(total)})"))
    return _print_rows(rows)


def cmd_info(args) -> int:
    from .loading.folder import TEXT_ENCODER_SLOTS, _slot_present, _text_config
    from .loading.family import detect_family
    from .loading.weights import find_weights
    from .models.config import read_json

    root = Path(args.model).expanduser()
    if not root.exists():
        raise UsageError(f"argument MODEL: model folder or file not found: {root}")
    if not root.is_dir():
        return _info_single_file(root)
    index = read_json(root / "model_index.json")
    unet_cfg = read_json(root / "unet" / "config.json")
    vae_cfg = read_json(root / "vae" / "config.json")
    sched_cfg = read_json(root / "scheduler" / "scheduler_config.json")
    slots = [s for s in TEXT_ENCODER_SLOTS if _slot_present(root, index, s)]
    n = 2 if "text_encoder_2" in slots else 1
    te_cfgs = [_text_config(root / s / "config.json")[0] if s in slots else None for s in TEXT_ENCODER_SLOTS[:n]]
    info = detect_family(unet_cfg, te_cfgs, sched_cfg, vae_cfg)

    size = unet_cfg.get("sample_size", 64)
    h, w = (size, size) if isinstance(size, int) else size
    rows = [
        ("model", str(root)),
        ("family", info.family + (" (refiner)" if info.refiner else "")),
        ("kind", f"{info.kind} (unet in_channels={info.in_channels})"),
        ("prediction type", info.prediction_type),
        ("default size", f"{w * info.latent_factor}x{h * info.latent_factor}"),
        ("latent factor", str(info.latent_factor)),
        ("scheduler", sched_cfg.get("_class_name", "?")),
    ]
    comps = [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model")]
    comps += [(s, "model") for s in slots]
    total = 0
    for name, stem in comps:
        count, dtypes = weights_summary(find_weights(root / name, stem))
        total += count
        rows.append((f"{name} parameters", f"{count:,} ({_human(count)}, {dtypes})"))
    rows.append(("total parameters", f"{total:,} ({_human(total)})"))
    return _print_rows(rows)


def _print_rows(rows) -> int:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k + ':':<{width + 1}} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
