"""Training on several processes, on one machine or several: ``torchrun --nproc_per_node N``
(GPUs or CPUs) or, on GPUs, ``accelerate launch --multi_gpu --num_processes N`` (its ``--cpu``
starts one process, so CPUs use torchrun). accelerate's
``PartialState`` joins the process group the launcher describes (NCCL on GPUs, gloo on CPUs)
and gives each process its device; gradients are summed with ``torch.distributed``.

A run on N processes equals a run on one process with the same global batch
(``batch_size * N``). Every process draws the global batch as one process would (data
order, crops, flips, captions, VAE sample, noise, timesteps: the same RNG stream, seeded
alike, on every rank), then runs the UNet on its own rows only (rank r: examples
``r*batch_size ..`` of the global batch, none when a short last batch runs out); its loss is
weighted by its share of the batch and the gradients are summed, which is the gradient of the
global batch's mean loss. The RNG and data state are therefore the same on every rank: rank 0
saves them once and a checkpoint resumes on any number of processes. Draws inside the model
(dropout) come from a per-rank generator derived from the seed, rank and step, so they cannot
desynchronise the shared stream.

Why not ``Accelerator.prepare``: its data loader pads a short last batch with examples from
the epoch's start and DDP averages equal shares, and per-process seeds make the draws depend
on N; each would make N processes train differently from one. The cost of this design: every
process loads and VAE-encodes the whole global batch (``--cache-latents`` removes the encode).
"""
from __future__ import annotations

import os
import random
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch

__all__ = ["Processes"]

BUCKET = 1 << 24  # gradient elements summed in one collective call (64 MiB in float32)


class Processes:
    """``rank`` of ``world`` processes; ``device`` the one this process trains on."""

    def __init__(self, rank: int = 0, world: int = 1, device="cpu", state=None):
        self.rank, self.world, self.device, self.state = rank, world, device, state

    @classmethod
    def from_env(cls, device="cpu") -> "Processes":
        """One process unless a launcher set ``WORLD_SIZE`` > 1; then join its process group.
        A CUDA ``device`` becomes this process's GPU (``cuda:LOCAL_RANK``)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(device=device)
        from accelerate import PartialState

        cpu = torch.device(device).type == "cpu"
        state = PartialState(cpu=cpu)
        return cls(state.process_index, state.num_processes, device if cpu else state.device, state)

    @property
    def main(self) -> bool:
        """Whether this process writes files and shows the progress bar."""
        return self.rank == 0

    def main_first(self):
        """A block rank 0 runs before the others (e.g. making class images the others then find)."""
        return self.state.main_process_first() if self.state is not None else nullcontext()

    def shared_seed(self, seed: Optional[int]) -> Optional[int]:
        """``seed``, or without one a seed drawn by rank 0 for all: every rank needs the same stream."""
        if self.world == 1 or seed is not None:
            return seed
        import torch.distributed as dist

        drawn = torch.tensor([random.SystemRandom().randrange(2**31) if self.main else 0], device=self.device)
        dist.broadcast(drawn, 0)
        return int(drawn.item())

    def rows(self, batch: int, per_process: int, halves: int = 1) -> Optional[list[int]]:
        """This rank's rows of a global batch of ``batch`` rows made of ``halves`` equal parts
        (prior preservation: instances, then their class images); None on one process."""
        if self.world == 1:
            return None
        n = batch // halves
        lo, hi = min(self.rank * per_process, n), min((self.rank + 1) * per_process, n)
        return [h * n + i for h in range(halves) for i in range(lo, hi)]

    @contextmanager
    def local_rng(self, seed: Optional[int], batch: int):
        """Draws of this rank's forward and backward (dropout) from its own stream, seeded by
        ``seed``, the rank and the ``batch`` count; on one process the global stream, unchanged."""
        if self.world == 1:
            yield
            return
        dev = torch.device(self.device)
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(((seed * 1_000_003 + self.rank) * 1_000_003 + batch) % 2**63)
            yield

    def sum_(self, tensors: list) -> None:
        """Sum ``tensors`` in place over the processes, in buckets of flattened tensors."""
        if self.world == 1 or not tensors:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        bucket: list = []
        for i, t in enumerate(tensors):
            bucket.append(t)
            if i == len(tensors) - 1 or sum(b.numel() for b in bucket) >= BUCKET \
                    or tensors[i + 1].dtype != t.dtype or tensors[i + 1].device != t.device:
                flat = _flatten_dense_tensors(bucket)
                dist.all_reduce(flat)
                for b, s in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    b.copy_(s)
                bucket = []
