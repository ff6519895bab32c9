"""Items on a Ray cluster: one actor per device, each holding its pipeline (a :class:`Worker`),
one task per item, results streamed back as they finish. The driver writes every file, so the
machines need not share a folder; they need the same model folders at the same paths.
"""
from __future__ import annotations

from typing import Iterator

__all__ = ["generate"]


def generate(items: list, folders, *, device: str = "auto", dtype: str = "auto", address: str | None = None,
             workers: int | None = None) -> Iterator[tuple]:
    """``(item, outputs)`` for each of ``items``, in the order they finish. Attaches to Ray as
    already initialised in this process, else ``ray.init(address)`` (None or "": a new local
    cluster, or the one ``RAY_ADDRESS`` names; "auto": the running one), shut down after.
    ``workers``: actors to start (default: the cluster's GPUs for a CUDA device, else its CPUs)."""
    import ray
    from ray.util import ActorPool

    from .worker import ItemError, Worker

    if not items:  # all done: no cluster to start
        return
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or None, include_dashboard=False)
    try:
        gpu = device.startswith("cuda") or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        available = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1))
        n = max(1, min(workers or available, len(items)))
        actor = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(Worker)
        pool = ActorPool([actor.remote(folders, "cuda" if gpu else device, dtype) for _ in range(n)])
        by_id = {it.id: it for it in items}
        try:
            for item_id, outputs in pool.map_unordered(lambda a, it: a.run.remote(it), items):
                yield by_id[item_id], outputs
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ItemError):
                raise e.cause from None  # the line and the error, not the remote traceback
            raise
    finally:
        if started:
            ray.shutdown()
