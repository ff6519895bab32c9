"""Which examples each step sees: a new random order every epoch, drawn as torch's
``DataLoader(shuffle=True)`` draws it (the iterator's base seed, then the sampler's seed,
then ``randperm``), so a seed gives the order of diffusers' scripts. The state (epoch, order,
position) is plain data, saved in checkpoints for an exact resume mid-epoch.

With aspect-ratio buckets (``groups``: each example's bucket) every batch comes from one
bucket, as kohya's: each bucket's examples shuffled and cut into batches, then the batches
shuffled; ``order`` is then the epoch's batches and ``position`` counts batches."""
from __future__ import annotations

import torch

__all__ = ["Batches"]


class Batches:
    def __init__(self, count: int, batch_size: int, epoch: int = -1, order=None, position: int = 0, groups=None):
        self.count, self.batch_size, self.groups = count, batch_size, groups
        self.epoch, self.order, self.position = epoch, list(order or []), position

    def _shuffle(self) -> list:
        torch.empty((), dtype=torch.int64).random_()  # DataLoader's iterator: its workers' base seed
        seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's generator seed
        g = torch.Generator().manual_seed(seed)
        if self.groups is None:
            return torch.randperm(self.count, generator=g).tolist()
        batches = []
        for bucket in sorted(set(self.groups)):
            members = [i for i, b in enumerate(self.groups) if b == bucket]
            members = [members[k] for k in torch.randperm(len(members), generator=g).tolist()]
            batches += [members[k:k + self.batch_size] for k in range(0, len(members), self.batch_size)]
        return [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]

    def next(self) -> list[int]:
        """The example indices of the next batch (the last batch of an epoch, or of a bucket, may be smaller)."""
        if self.position >= len(self.order):
            self.epoch += 1
            self.order, self.position = self._shuffle(), 0
        if self.groups is not None:
            self.position += 1
            return list(self.order[self.position - 1])
        batch = self.order[self.position:self.position + self.batch_size]
        self.position += len(batch)
        return batch

    def state(self) -> dict:
        state = {"epoch": self.epoch, "order": [list(b) if isinstance(b, list) else b for b in self.order],
                 "position": self.position, "count": self.count}
        return state if self.groups is None else dict(state, groups=list(self.groups))
