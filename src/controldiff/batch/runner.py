"""A batch run: read and check every item, skip the finished ones, generate the rest (here, on
this rank's share, or on Ray) and save each item as it finishes."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .jobs import read_jobs
from .manifest import Manifest
from .shard import Shard

__all__ = ["run_batch", "Summary"]

@dataclass(frozen=True)
class Summary:
    """What a run did: items generated (and their images), items found already done."""

    generated: int
    images: int
    skipped: int
    shard: Shard


def run_batch(jobs: Path, out: Path, folders, *, device: str = "auto", dtype: str = "auto", shard: Shard | None = None,
              ray: str | None = None, workers: int | None = None, progress: bool = True) -> Summary:
    """Generate the items of the jobs file ``jobs`` into the folder ``out``.

    ``shard``: this process's share (default: from the torchrun/accelerate environment).
    ``ray``: None runs here; a string runs on Ray (:func:`ray_jobs.generate`: "" a local
    cluster, or an address), ``workers`` actors."""
    from ..outputs import _check_folder

    shard = Shard.from_env() if shard is None else shard
    if ray is not None and shard.world > 1:
        raise ValueError("--ray: runs on Ray, not under torchrun/accelerate launch (WORLD_SIZE > 1): choose one")
    items = read_jobs(jobs, folders)          # every line checked before any model loads
    _check_folder(Path(out), "--out")
    manifest = Manifest(out)
    done = manifest.finished()
    mine = shard.take(items)
    todo = [it for it in mine if it.id not in done]
    if any(it.model is None for it in todo):
        from ..demo import DEMO_NOTICE

        print(DEMO_NOTICE, file=sys.stderr)
    if ray is not None:
        from .ray_jobs import generate

        results = generate(todo, folders, device=device, dtype=dtype, address=ray, workers=workers)
    else:
        results = _here(todo, folders, shard.device(device), dtype)
    bar = _bar(len(mine), len(mine) - len(todo), shard, progress)
    images = generated = 0
    try:
        for item, outputs in results:
            manifest.save(item, outputs)
            generated, images = generated + 1, images + len(outputs)
            bar.update(1)
    finally:
        bar.close()
    return Summary(generated, images, len(mine) - len(todo), shard)


def _here(items, folders, device: str, dtype: str):
    """The items generated in this process, those of one model together (the order changes
    no image): each model is loaded once."""
    from .worker import Worker

    if not items:
        return
    first = {}
    for it in items:
        first.setdefault(it.model, len(first))
    worker = Worker(folders, device, dtype)
    for item in sorted(items, key=lambda it: first[it.model]):
        _, outputs = worker.run(item)
        yield item, outputs


def _bar(total: int, initial: int, shard: Shard, progress: bool):
    """A bar over this rank's items; shown by rank 0 only (ranks share a terminal)."""
    from tqdm import tqdm

    desc = "batch" if shard.world == 1 else f"rank 0 of {shard.world}"
    return tqdm(total=total, initial=initial, desc=desc, unit="item", disable=not progress or shard.rank != 0,
                file=sys.stderr, dynamic_ncols=True)
