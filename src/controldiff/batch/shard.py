"""Which items this process does under ``torchrun`` or ``accelerate launch``: item i (in file
order) belongs to rank ``i % world``. The ranks never talk to each other (no process group):
each writes its own items and records, so one rank failing stops no other and spoils
nothing; a rerun, on any number of processes, does what is left."""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Shard"]


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env=None) -> "Shard":
        """From the launcher's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (both torchrun and
        accelerate set them); one process when they are absent."""
        env = os.environ if env is None else env

        def number(name: str, default: int) -> int:
            try:
                return int(env.get(name, default))
            except ValueError:
                raise ValueError(f"environment variable {name}: expected an integer, got {env[name]!r}") from None

        world, rank, local = number("WORLD_SIZE", 1), number("RANK", 0), number("LOCAL_RANK", 0)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"environment variables RANK={rank}, WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
        return cls(rank, world, local)

    def take(self, items: list) -> list:
        """This rank's items."""
        return items[self.rank::self.world]

    def device(self, device: str) -> str:
        """``device`` for this rank: on several processes, "auto" and "cuda" (with CUDA
        present) mean this machine's GPU ``LOCAL_RANK``."""
        if self.world > 1 and device in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available():
                return f"cuda:{self.local_rank}"
        return device
