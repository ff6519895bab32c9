"""Which examples each step sees: a new random order every epoch, drawn as torch's
``DataLoader(shuffle=True)`` draws it (the iterator's base seed, then the sampler's seed,
then ``randperm``), so a seed gives the order of diffusers' scripts. The state (epoch, order,
position) is plain data, saved in checkpoints for an exact resume mid-epoch."""
from __future__ import annotations

import torch

__all__ = ["Batches"]


class Batches:
    def __init__(self, count: int, batch_size: int, epoch: int = -1, order=None, position: int = 0):
        self.count, self.batch_size = count, batch_size
        self.epoch, self.order, self.position = epoch, list(order or []), position

    def _shuffle(self) -> list[int]:
        torch.empty((), dtype=torch.int64).random_()  # DataLoader's iterator: its workers' base seed
        seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's generator seed
        return torch.randperm(self.count, generator=torch.Generator().manual_seed(seed)).tolist()

    def next(self) -> list[int]:
        """The example indices of the next batch (the last batch of an epoch may be smaller)."""
        if self.position >= len(self.order):
            self.epoch += 1
            self.order, self.position = self._shuffle(), 0
        batch = self.order[self.position:self.position + self.batch_size]
        self.position += len(batch)
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "order": list(self.order), "position": self.position, "count": self.count}
