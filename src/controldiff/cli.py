"""The ``controldiff`` command line: ``generate`` images, show model ``info``, ``train`` (training/cli.py).

Exit status: 0 done; 2 bad input (arguments, files, configs), reported as one line
``controldiff: error: <message>`` like argparse's own errors (a traceback would bury the
message); 1 an image could not be written (a full disk), the images already written kept;
130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM: both stop after the current step and
keep the finished images.
"""
from __future__ import annotations

import argparse
import math
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .generation import generate, infotext, load_extras, model_name, prompt_loras, random_seed

PROG = "controldiff"
_EXIT_FAILED, _EXIT_USAGE = 1, 2
_EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as shells report


class UsageError(Exception):
    """A bad command-line value found after parsing (reported like argparse's errors)."""


class _Aborted(Exception):
    """A second Ctrl-C or SIGTERM: stop at once."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def scheduler_names() -> tuple[str, ...]:
    from .schedulers import NAMES

    return tuple(NAMES)


# ----------------------------------------------------------------------------- parser


def _scheduler(text: str) -> str:
    """Our scheduler name, or A1111's sampler name ("Euler a", "DPM++ 2M Karras")."""
    from .schedulers.a1111 import from_a1111

    name = from_a1111(text)
    if name not in scheduler_names():
        raise argparse.ArgumentTypeError(f"unknown scheduler {text!r}; one of: {', '.join(scheduler_names())} "
                                         "(or A1111's names for them, e.g. 'Euler a', 'DPM++ 2M Karras')")
    return name



def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):  # nan and inf parse as floats: refuse them here, not after sampling
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _seed(text: str) -> int:
    from .noise import check_seed  # the library's seed range, [0, 2**64)

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    try:
        return check_seed(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("seed: ")) from None


def _a1111_clip_skip(text: str) -> Optional[int]:
    """A1111's "Clip skip: N" uses the N-th layer from the end: our clip_skip is N - 1 (1: none)."""
    n = _positive_int(text)
    return n - 1 or None


def _text(text: str) -> str:
    """Command-line text the tokenizer and the PNG can hold. Python turns bytes of argv that
    are not UTF-8 into lone surrogates; refuse them here, naming the argument."""
    from .text.encode import check_text  # the library's rule and message

    try:
        return check_text(text, "text")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("text: ")) from None


class _NegativePrompt(argparse.Action):
    """``-n``/``--negative``: the negative prompt. ``-n 3`` is refused: a bare number after the
    short option is almost surely meant as the image count (``--num-images``), and would
    otherwise silently become the negative prompt "3"."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "-n" and re.fullmatch(r"\s*\d+\s*", values):
            parser.error(f"argument -n/--negative: -n is the negative prompt, and {values!r} looks like an image "
                         f"count: use --num-images {values.strip()} (or --negative {values.strip()} if the "
                         "negative prompt really is that number)")
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Controlled generation with Stable Diffusion-family models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser("generate", help="generate images from a prompt (txt2img, img2img, inpainting)",
                       description="Generate images. Without MODEL, uses the built-in demo model (64x64 scenes of coloured shapes). "
                                   "Steps, guidance and strength default to the reference pipeline's values for "
                                   "the model's family and task; the PNG records the values used.")
    g.add_argument("model", nargs="?", metavar="MODEL",
                   help="diffusers model folder or single-file checkpoint (default: the demo model)")
    g.add_argument("--prompt", "-p", default="", type=_text, help="what to draw")
    g.add_argument("--negative", "-n", default=None, type=_text, action=_NegativePrompt, metavar="TEXT",
                   help="negative prompt")
    g.add_argument("--width", type=_positive_int, help="image width in pixels (default: the model's)")
    g.add_argument("--height", type=_positive_int, help="image height in pixels (default: the model's)")
    g.add_argument("--steps", type=_positive_int, help="sampling steps (default: the reference's, 50 for most)")
    g.add_argument("--guidance", "--cfg", type=_finite_float, dest="guidance",
                   help="classifier-free guidance scale; <= 1 disables it (default: 7.5, SDXL 5.0)")
    g.add_argument("--scheduler", "--sampler", type=_scheduler, metavar="NAME",
                   help="one of: " + ", ".join(scheduler_names()) + ", or A1111's name ('Euler a', "
                        "'DPM++ 2M Karras'; default: the model folder's)")
    g.add_argument("--seed", type=_seed, help="random seed in [0, 2**64) (default: a random one, printed and saved)")
    g.add_argument("--from-png", type=Path, metavar="IMAGE", dest="from_png",
                   help="remake an image from a PNG's A1111 'parameters' text (ours or A1111's): prompt, "
                        "negative, steps, sampler, CFG, seed, size, clip skip, LoRAs (with --lora-dir), "
                        "ControlNet settings; warns where a file's hash differs; options given here win")
    g.add_argument("--num-images", type=_positive_int, default=1, dest="num_images", metavar="N",
                   help="number of images; image i uses seed + i (default: 1)")
    g.add_argument("--image", type=Path, metavar="PATH", help="init image (img2img, or inpainting with --mask)")
    g.add_argument("--mask", type=Path, metavar="PATH", help="inpainting mask, white = repaint (needs --image)")
    g.add_argument("--strength", type=_finite_float,
                   help="how much to change --image, in (0, 1] (default: the reference's, 0.8 img2img, 1.0 inpaint)")
    g.add_argument("--out", "-o", metavar="PATH",
                   help="output PNG, or a folder for numbered files (default: outputs/NNNNN-SEED.png)")
    g.add_argument("--overwrite", action="store_true", help="replace existing files named by --out")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="LoRA file (kohya or peft/diffusers), repeatable; weight default 1.0")
    g.add_argument("--lora-dir", action="append", default=[], type=Path, metavar="DIR", dest="lora_dirs",
                   help="folder of LoRA files for <lora:NAME:WEIGHT> tags in the prompt (NAME.safetensors, "
                        ".pt or .ckpt, searched recursively), repeatable")
    g.add_argument("--embedding", action="append", default=[], metavar="PATH[:TOKEN]",
                   help="textual inversion embedding, repeatable; token default: from the file")
    g.add_argument("--embedding-dir", action="append", default=[], type=Path, metavar="DIR",
                   dest="embedding_dirs",
                   help="folder of embeddings (NAME.pt/.safetensors/.bin): those whose NAME is a word of the "
                        "prompt or negative prompt are loaded, as A1111 does; repeatable")
    g.add_argument("--prompt-syntax", choices=("a1111", "compel", "none"), default="a1111",
                   help="prompt weighting syntax: (word:1.2) / word+ / plain (default: a1111)")
    g.add_argument("--clip-skip", type=_positive_int, metavar="N", help="skip the last N text encoder layers")
    g.add_argument("--controlnet", action="append", default=[], metavar="PATH:IMAGE[:SCALE]",
                   help="ControlNet folder (or file) and its control image, repeatable; with --from-png, the "
                        "PNG's unit for that model gives start, end and (without SCALE) the weight")
    g.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="weights dtype (default auto: float16 on cuda, bfloat16 on a CPU with native bf16 "
                        "(AVX512-BF16/AMX), else float32; latents and scheduler stay float32)")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="show a model folder's family, kind and sizes",
                       description="Show what a model folder holds, read from its configs and weight headers.")
    i.add_argument("model", metavar="MODEL", help="diffusers model folder or single-file checkpoint")
    i.set_defaults(func=cmd_info)

    from .training.cli import add_parser as add_train_parser

    add_train_parser(sub)
    from .batch.cli import add_parser as add_batch_parser

    add_batch_parser(sub)
    from .serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
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
        return _EXIT_SIGNAL[signal.SIGINT]
    except _Aborted as e:
        print(f"\n{PROG}: aborted ({e})", file=sys.stderr)
        return _EXIT_SIGNAL[e.signum]


# ----------------------------------------------------------------------------- generate


def _device_and_dtype(device: str, dtype: str):
    """The torch device, checked usable here (a one-line error, not torch's AssertionError
    from deep inside the first allocation), and the dtype."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"argument --device: not a torch device: {device!r}") from None
    try:
        torch.empty(0, device=dev)
    except (AssertionError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"argument --device: {device} is not available here ({detail})") from None
    from .precision import resolve_dtype

    return dev, resolve_dtype(dtype, dev)   # "auto": float16 on cuda, bfloat16 on a CPU with native bf16


def _model_path(model: str | None) -> tuple[Path, bool]:
    """The folder to load and whether it is the demo model."""
    if model is None:
        from .demo import default_model_path

        return default_model_path(), True
    path = Path(model).expanduser()
    if not path.exists():
        raise UsageError(f"argument MODEL: model folder or file not found: {path}")
    return path, False


def _settings_from_png(args) -> dict[str, str]:
    """Fill the options left unset from the PNG's infotext (A1111's fields); return the fields."""
    from .png import parse_parameters, read_parameters
    from .schedulers.a1111 import from_a1111

    if not args.from_png.is_file():
        raise UsageError(f"argument --from-png: file not found: {args.from_png}")
    try:
        text = read_parameters(args.from_png)
    except OSError as e:
        raise UsageError(f"argument --from-png: {args.from_png}: not a readable image ({e})") from None
    if text is None:
        raise UsageError(f"argument --from-png: {args.from_png} has no 'parameters' text (no generation settings)")
    p = parse_parameters(text)

    def take(key, dest, convert):
        if p.get(key) not in (None, "") and getattr(args, dest) in (None, ""):
            try:
                setattr(args, dest, convert(p[key]))
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise UsageError(f"argument --from-png: {args.from_png}: cannot read {key}: {p[key]!r} ({e})") from None

    take("Prompt", "prompt", str)
    take("Negative prompt", "negative", str)
    take("Steps", "steps", _positive_int)
    take("CFG scale", "guidance", _finite_float)
    take("Seed", "seed", _seed)
    take("Size-1", "width", _positive_int)
    take("Size-2", "height", _positive_int)
    take("Clip skip", "clip_skip", _a1111_clip_skip)
    if p.get("Sampler") and args.scheduler is None:
        name = from_a1111(p["Sampler"], p.get("Schedule type"))
        if name not in scheduler_names():
            raise UsageError(f"argument --from-png: {args.from_png}: sampler {p['Sampler']!r} "
                             f"{p.get('Schedule type') or ''} has no equivalent here; pass --scheduler")
        args.scheduler = name
    if p.get("Model") and args.model is None:
        made = p["Model"] + (f" (hash {p['Model hash']})" if p.get("Model hash") else "")
        _note(args, f"was made with Model {made}; pass MODEL to use it")
    return p


def _note(args, text: str, kind: str = "note") -> None:
    print(f"{PROG}: {kind}: {args.from_png.name} {text}", file=sys.stderr)


def _png_loras(args, p: dict) -> list[tuple[Path, float]]:
    """Our PNGs' ``Lora: "name:weight ..."`` (LoRAs given by --lora), found in --lora-dir; used
    when no --lora is given (the command line wins)."""
    from .text.extra_networks import find_file

    out = []
    for item in p.get("Lora", "").split():
        name, _, weight = item.rpartition(":")
        try:
            w = _finite_float(weight)
        except argparse.ArgumentTypeError:
            name, w = item, 1.0
        path = find_file(name, args.lora_dirs)
        if path is None:
            _note(args, f"was made with Lora {item}; pass --lora or a --lora-dir holding {name}.safetensors")
        else:
            out.append((path, w))
    return out


def _check_hashes(args, p: dict, model_hash: str, lora_hashes: dict, ti_hashes: dict) -> None:
    """Warn where a file loaded now is not the one the PNG names (its hash differs), and say
    which networks of the PNG were not loaded."""
    from .png import parse_hashes

    theirs = p.get("Model hash", "")
    if args.model is not None and len(theirs) >= 10 and not model_hash.startswith(theirs.lower()):
        _note(args, f"was made with Model hash {theirs} ({p.get('Model') or 'no name'}); MODEL {args.model} has "
                    f"hash {model_hash}: the image may differ", "warning")
    for key, loaded, what, flag in (("Lora hashes", lora_hashes, "LoRA", "--lora-dir (or --lora)"),
                                    ("TI hashes", ti_hashes, "embedding", "--embedding-dir or --embedding")):
        for name, h in parse_hashes(p.get(key, "")).items():
            ours = {re.sub("[:,]", "", n): v for n, v in loaded.items()}.get(name)
            if ours is None:
                _note(args, f"was made with {what} {name} (hash {h}), not loaded here; pass {flag}")
            elif not ours.startswith(h.lower()):
                _note(args, f"was made with {what} {name} of hash {h}; the one loaded has hash {ours}: "
                            "the image may differ", "warning")


def _check_args(args) -> None:
    from .noise import SEED_LIMIT

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
    for flag, folders in (("--lora-dir", args.lora_dirs), ("--embedding-dir", args.embedding_dirs)):
        for d in folders:
            if not d.is_dir():
                raise UsageError(f"argument {flag}: folder not found: {d}")
    if args.seed is not None and args.seed + args.num_images > SEED_LIMIT:
        raise UsageError(f"argument --seed/--num-images: image i uses seed + i, and {args.seed} + "
                         f"{args.num_images - 1} is past the largest seed, 2**64 - 1; lower --seed or --num-images")


def _check_size(args, factor: int) -> None:
    for flag, v in (("--width", args.width), ("--height", args.height)):
        if v is not None and v % factor:
            raise UsageError(f"argument {flag}: {v} is not a multiple of {factor} (this model's latent factor); "
                             f"try {max(factor, v - v % factor)}")


def _outputs(args):
    from .outputs import plan

    try:
        return plan(args.out, args.num_images, overwrite=args.overwrite)
    except ValueError as e:
        raise UsageError(f"argument {e}") from None


class _Cancel:
    """Ctrl-C (SIGINT) or SIGTERM stops sampling at the end of the current step (the
    callback returns False); the finished images are kept. A second signal aborts at once."""

    def __init__(self):
        self.signal = None
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __call__(self, i, t, latents):
        return not self.requested

    def _handler(self, signum, frame):
        if self.requested:
            raise _Aborted(signum)
        self.signal = signum
        key = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{PROG}: {key}: stopping after this step (again to abort)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in _EXIT_SIGNAL:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def cmd_generate(args) -> int:
    from .loading.hashes import model_hash
    from .text.extra_networks import embedding_files
    from .loading.inspect import quick_summary  # configs and headers only: checks before the weights load
    from .pipeline import Pipeline

    # Everything the command line can check is checked before the model loads.
    png = _settings_from_png(args) if args.from_png is not None else None
    _check_args(args)
    prompt, tagged = _prompt_loras(args)
    image = _open_image(args.image, "--image", "RGB")
    mask = _open_image(args.mask, "--mask", "L")
    device, dtype = _device_and_dtype(args.device, args.dtype)
    outputs = _outputs(args)
    path, is_demo = _model_path(args.model)
    summary = quick_summary(path)
    if summary is not None:
        _check_size(args, summary.info.latent_factor)
    loras = [_split_suffix(v, "--lora", float) for v in args.lora]
    embeddings = [_split_suffix(v, "--embedding", _text) for v in args.embedding]
    controlnets = [_controlnet_arg(v) for v in args.controlnet]
    for flag, specs in (("--lora", loras), ("--embedding", embeddings)):
        for p, _ in specs:
            if not p.exists():
                raise UsageError(f"argument {flag}: file not found: {p}")
    if png is not None:
        loras = loras or _png_loras(args, png)
        controlnets = _restore_controlnets(args, png, controlnets)
    for p, _ in loras:
        if p.stem in tagged:
            raise UsageError(f"argument --lora: {p.stem} is also in the prompt as {tagged[p.stem].tag}; give it once")
    if is_demo:
        from .demo import DEMO_NOTICE

        print(DEMO_NOTICE)

    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(path, device=device, dtype=dtype)
    print(f"Loaded {path} ({pipe.info.family}, {pipe.info.kind}, {str(dtype).removeprefix('torch.')}) "
          f"in {time.perf_counter() - t0:.1f} s")
    _check_size(args, pipe.info.latent_factor)
    pipe.prompt_syntax = args.prompt_syntax
    mhash = model_hash(path)
    extras = load_extras(pipe, prompt=prompt, negative=args.negative, loras=loras, tagged=tagged,
                         embeddings=embeddings, named_embeddings=embedding_files(args.embedding_dirs),
                         prompt_syntax=args.prompt_syntax, clip_skip=args.clip_skip)
    if png is not None:
        _check_hashes(args, png, mhash, extras.lora_hashes, extras.ti_hashes)
    controls = [_build_controlnet(arg, device, dtype) for arg in controlnets]

    seed = args.seed if args.seed is not None else random_seed()
    seeds = [seed + i for i in range(args.num_images)]
    if args.seed is None:
        print(f"Seed: {seed}")
    name = model_name(path, is_demo)
    mode = None if args.image is None else ("inpaint" if args.mask is not None else "img2img")
    # Only what the user gave is passed: the rest takes the library's per-family defaults,
    # and the PNG records the values out.settings says were used.
    given = {k: v for k, v in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance),
                               ("strength", args.strength)) if v is not None}

    # One image at a time, each saved as soon as it is done: a signal loses only the image in
    # progress. Each has its own CPU generator, so image i is remade alone with --seed SEED+i.
    cancel = _Cancel()
    t1 = time.perf_counter()
    saved, steps_run = [], 0
    images = generate(pipe, prompt, seeds, callback=lambda n, i, t, x: cancel(i, t, x), negative_prompt=args.negative,
                      height=args.height, width=args.width, scheduler=args.scheduler, image=image, mask_image=mask,
                      controls=controls, clip_skip=args.clip_skip, **given)
    with cancel:
        try:
            for i, s, out in images:
                if out.cancelled:
                    done = out.steps_done
                    print(f"{PROG}: cancelled after {done} step{'s' * (done != 1)} of image {i + 1}; "
                          f"{_kept(saved)}", file=sys.stderr)
                    return _EXIT_SIGNAL[cancel.signal or signal.SIGINT]
                steps_run += out.steps_done
                text = infotext(args.prompt, args.negative, out.settings, out.images[0], s, model=name,
                                model_hash=mhash, extra=extras.params, mode=mode, controls=controls,
                                controlnet_names=[c.path.name for c in controlnets])
                try:
                    p = outputs.save(i, s, lambda f: _write_png(out.images[0], f, text))
                except OSError as e:
                    where = e.filename or outputs.folder
                    print(f"{PROG}: error: cannot save image {i + 1} in {where}: {e.strerror or e}; {_kept(saved)}",
                          file=sys.stderr)
                    return _EXIT_FAILED
                saved.append(p)
                print(p, flush=True)  # a script reading our output sees each image as it is saved
                if cancel.requested:  # the signal came while this image was finishing: it is kept
                    print(f"{PROG}: stopped after image {i + 1}; {_kept(saved)}", file=sys.stderr)
                    return _EXIT_SIGNAL[cancel.signal]
        except (ValueError, FloatingPointError) as e:  # e.g. NaN in image 3: say what was kept
            if not saved:
                raise
            n = len(saved)
            print(f"{PROG}: error: image {n + 1} (seed {seeds[n]}): {e}; {_kept(saved)}", file=sys.stderr)
            return _EXIT_USAGE  # as main() reports these errors
    elapsed = time.perf_counter() - t1
    print(f"Generated {len(saved)} image{'s' * (len(saved) != 1)} in {elapsed:.1f} s "
          f"({elapsed / max(steps_run, 1):.2f} s/step)")
    return 0


def _kept(saved: list) -> str:
    n = len(saved)
    return f"{n} finished image{'s' * (n != 1)} kept"


def _write_png(image, f, text: str) -> None:
    from .png import write_png

    write_png(image, f, text)


def _split_suffix(value: str, flag: str, convert):
    """"PATH:SUFFIX" -> (Path, converted suffix or None); a path may itself contain ':'."""
    path, sep, tail = value.rpartition(":")
    if sep and path and not Path(value).exists():
        try:
            return Path(path), convert(tail)
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise UsageError(f"argument {flag}: cannot read {tail!r} in {value!r} ({e})") from None
    return Path(value), None


def _prompt_loras(args) -> tuple[str, dict]:
    """The prompt without its ``<lora:...>`` tags and the LoRAs they name, found in --lora-dir
    (:func:`controldiff.generation.prompt_loras`); other tags are left out with a note."""
    try:
        prompt, tagged, ignored = prompt_loras(args.prompt, args.lora_dirs, "no --lora-dir given")
    except ValueError as e:
        raise UsageError(f"argument --prompt: {str(e).removeprefix('prompt: ')}") from None
    for text in ignored:
        print(f"{PROG}: note: {text} left out of the prompt: only lora and lyco tags are loaded", file=sys.stderr)
    return prompt, tagged


@dataclass(frozen=True)
class _ControlNetArg:
    """One ``--controlnet PATH:IMAGE[:SCALE]``, checked (and its image read) before loading;
    ``scale`` None when not given (1.0, or the PNG's with --from-png)."""

    path: Path
    image: Any
    scale: float | None
    start: float = 0.0
    end: float = 1.0


def _controlnet_arg(value: str) -> _ControlNetArg:
    parts = value.split(":")
    if len(parts) not in (2, 3):
        raise UsageError(f"argument --controlnet: expected PATH:IMAGE[:SCALE], got {value!r}")
    scale = None
    if len(parts) == 3:
        try:
            scale = _finite_float(parts[2])
        except argparse.ArgumentTypeError:
            raise UsageError(f"argument --controlnet: scale {parts[2]!r} is not a finite number") from None
        if scale < 0:
            raise UsageError(f"argument --controlnet: scale {parts[2]!r} is negative")
    model_path, image_path = Path(parts[0]), Path(parts[1])
    for what, p in (("model", model_path), ("image", image_path)):
        if not p.exists():
            raise UsageError(f"argument --controlnet: {what} not found: {p}")
    return _ControlNetArg(model_path, _open_image(image_path, "--controlnet", "RGB"), scale)


def _build_controlnet(arg: _ControlNetArg, device, dtype):
    from .controls.controlnet import ControlNet
    from .loading.control_models import load_controlnet

    return ControlNet(load_controlnet(arg.path, device=device, dtype=dtype), arg.image,
                      scale=1.0 if arg.scale is None else arg.scale, start=arg.start, end=arg.end)


def _restore_controlnets(args, p: dict, given: list[_ControlNetArg]) -> list[_ControlNetArg]:
    """The PNG's ControlNet units (sd-webui-controlnet's ``ControlNet N`` fields) for the
    --controlnet models, matched by model name in unit order: start and end from the unit, and
    its weight unless SCALE was given. The PNG holds no control image: units left over are named."""
    import dataclasses

    from .png import control_units

    try:
        units = control_units(p)
    except ValueError as e:
        _note(args, f"has a ControlNet unit that cannot be read ({e}); its settings are not restored", "warning")
        return given
    out = []
    for arg in given:
        match = next((i for i, u in units.items() if
                      re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", u.get("Model", "")) in (arg.path.stem, arg.path.name)), None)
        if match is None:
            out.append(arg)
            continue
        unit = units.pop(match)
        values = {}
        for key, label in (("scale", "Weight"), ("start", "Guidance Start"), ("end", "Guidance End")):
            if label in unit and not (key == "scale" and arg.scale is not None):
                try:
                    values[key] = _finite_float(unit[label])
                except argparse.ArgumentTypeError as e:
                    raise UsageError(f"argument --from-png: {args.from_png}: ControlNet {match} {label}: {e}") from None
        if unit.get("Control Mode", "Balanced") != "Balanced":
            _note(args, f"ControlNet {match} used Control Mode {unit['Control Mode']!r}; restored as Balanced")
        out.append(dataclasses.replace(arg, **values))
    for i, unit in units.items():
        _note(args, f"was made with ControlNet {i} ({', '.join(f'{k}: {v}' for k, v in unit.items())}); the PNG "
                    "holds no control image: pass --controlnet PATH:IMAGE to use it")
    return out


def _open_image(path: Path | None, flag: str, mode: str):
    """The image at ``path`` in ``mode`` (EXIF orientation applied), or None; unreadable
    files are a ValueError naming ``flag`` (:func:`controldiff.images.load_image`)."""
    from .images import load_image

    return None if path is None else load_image(path, flag).convert(mode)


# ----------------------------------------------------------------------------- info


def cmd_info(args) -> int:
    """Print what the model holds (:mod:`controldiff.loading.inspect`)."""
    from .loading.inspect import rows, summarize

    root = Path(args.model).expanduser()
    if not root.exists():
        raise UsageError(f"argument MODEL: model folder or file not found: {root}")
    lines = rows(summarize(root))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k + ':':<{width + 1}} {v}")
    return 0


if __name__ == "__main__":  # python -m controldiff.cli: run the package's module, so that the
    from controldiff.cli import main as _main  # error classes the subcommands raise are the ones caught

    sys.exit(_main())
