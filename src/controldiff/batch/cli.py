"""``controldiff batch JOBS --out DIR``: the command line of the batch runner (``controldiff.cli``
adds it as a subcommand). Exit status as ``generate``'s: 0 done, 2 bad input (every bad line
named before any model loads), 1 an item failed or a file could not be written (finished
items kept: rerun to resume), 130/143 interrupted by SIGINT/SIGTERM."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

__all__ = ["add_parser", "cmd_batch"]


def add_parser(sub) -> None:
    from ..cli import _positive_int

    b = sub.add_parser(
        "batch", help="generate the requests of a JSON-lines file (resumable; torchrun, accelerate or Ray)",
        description="Generate every request of JOBS (one JSON request a line, the server's native API fields, "
                    "controls included) into DIR as LINE-HASH-K.png, with a record per finished item in "
                    "DIR/manifest.jsonl. Every line is checked first. A rerun skips finished items; an item "
                    "without a seed gets one derived from its line, so reruns, ranks and Ray give the same "
                    "images. Under torchrun/accelerate launch each process does items i % WORLD_SIZE == RANK.")
    b.add_argument("jobs", type=Path, metavar="JOBS", help="JSON-lines file of requests")
    b.add_argument("--out", "-o", type=Path, required=True, metavar="DIR", help="output folder (made if needed)")
    b.add_argument("--model", type=Path, metavar="PATH",
                   help="model of the requests that name none (default: the demo model)")
    for flag, dest, what in (("--model-dir", "model_dirs", "models"), ("--lora-dir", "lora_dirs", "LoRAs"),
                             ("--embedding-dir", "embedding_dirs", "embeddings"),
                             ("--controlnet-dir", "controlnet_dirs", "ControlNets")):
        b.add_argument(flag, action="append", default=[], type=Path, metavar="DIR", dest=dest,
                       help=f"folder of the {what} requests may name, repeatable")
    b.add_argument("--device", default="auto",
                   help="torch device (default: cuda if available, else cpu; each rank its own GPU)")
    b.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="weights dtype (default auto, as generate's)")
    b.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray: a new local cluster, or the one at ADDRESS ('auto': the running one, "
                        "ray://HOST:10001); one actor per GPU (CPU on CPU-only clusters)")
    b.add_argument("--workers", type=_positive_int, metavar="N", help="Ray actors (default: one per GPU or CPU)")
    b.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")
    b.set_defaults(func=cmd_batch)


def folders_from_args(args):
    """The request ``Folders`` of the command line. Errors are ValueErrors (main() reports them)."""
    from ..request import Folders

    for flag, dirs in (("--model-dir", args.model_dirs), ("--lora-dir", args.lora_dirs),
                       ("--embedding-dir", args.embedding_dirs), ("--controlnet-dir", args.controlnet_dirs)):
        for d in dirs:
            if not d.is_dir():
                raise ValueError(f"argument {flag}: not a folder: {d}")
    if args.model is not None and not args.model.exists():
        raise ValueError(f"argument --model: model folder or file not found: {args.model}")
    return Folders(models=args.model_dirs, loras=args.lora_dirs, embeddings=args.embedding_dirs,
                   controlnets=args.controlnet_dirs, default_model=args.model)


def cmd_batch(args) -> int:
    from ..cli import _EXIT_SIGNAL, PROG
    from .runner import run_batch
    from .worker import ItemError

    def stop(signum, frame):  # e.g. torchrun stopping the other ranks when one failed
        print(f"\n{PROG} batch: stopped by SIGTERM; the finished items are kept: rerun to resume", file=sys.stderr)
        raise SystemExit(_EXIT_SIGNAL[signal.SIGTERM])  # unwinds: a file being written is removed

    folders = folders_from_args(args)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        summary = run_batch(args.jobs, args.out, folders, device=args.device, dtype=args.dtype, ray=args.ray,
                            workers=args.workers, progress=args.progress)
    except (ItemError, OSError) as e:
        print(f"{PROG} batch: error: {e}; the finished items are kept: rerun to resume", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    s = summary.shard
    who = "" if s.world == 1 else f"rank {s.rank} of {s.world}: "
    print(f"{who}generated {summary.generated} item{'s' * (summary.generated != 1)} ({summary.images} "
          f"image{'s' * (summary.images != 1)}) in {args.out}; {summary.skipped} already done")
    return 0
