"""Batch generation: ``controldiff batch jobs.jsonl --out DIR``, one native request a line.

Resumable (a finished item has its record in ``DIR/manifest.jsonl`` and is skipped; nothing
is written twice), deterministic (an item without a seed gets one from its line), sharded
under ``torchrun``/``accelerate launch`` (:mod:`.shard`) or across a Ray cluster
(:mod:`.ray_jobs`). :mod:`.ray_serve` deploys the HTTP API on Ray Serve.
"""
from .jobs import Item, JobsError, read_jobs
from .manifest import MANIFEST, Manifest, Output
from .runner import Summary, run_batch
from .shard import Shard
from .worker import ItemError, Worker

__all__ = ["Item", "JobsError", "read_jobs", "MANIFEST", "Manifest", "Output", "ItemError", "Summary", "run_batch",
           "Shard", "Worker"]
