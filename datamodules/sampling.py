"""Training samplers: length-bucketed batches, and one random caption per image per epoch.

A batch is decoded for as many steps as its longest caption, so a random batch pays for the
padding of its short captions. :class:`LengthBucketBatchSampler` takes the (shuffled) order
of any sampler, sorts pools of ``pool`` batches by caption length, cuts them into batches and
shuffles the batch order: batches hold captions of similar length, yet every epoch differs.
It follows ``BatchSampler``'s API (sampler, batch_size, drop_last) so Lightning can put a
DistributedSampler under it for DDP.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, Sampler


class LengthBucketBatchSampler(BatchSampler):
    """Batches of similar-length items.

    Args:
        sampler: gives the item order (e.g. RandomSampler); sorting happens within pools.
        batch_size, drop_last: as for BatchSampler.
        lengths: length of every item of the dataset (indexed like the dataset).
        pool: batches per sorting pool (larger = less padding, less randomness).
        seed: seeds the batch order (with the epoch, see set_epoch).
    """

    def __init__(self, sampler: Sampler | Sequence[int], batch_size: int, drop_last: bool = False,
                 lengths: Sequence[int] = (), pool: int = 50, seed: int = 0) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if not lengths:
            raise ValueError("LengthBucketBatchSampler needs the item lengths")
        self.lengths = torch.as_tensor(list(lengths))
        self.pool, self.seed, self.epoch = pool, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        size = self.batch_size * self.pool
        batches = []
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]


class OneCaptionPerImageSampler(Sampler[int]):
    """Each epoch: every image once, in random order, with one of its captions at random.

    ``groups[i]`` lists the dataset indices of image i's (image, caption) items; the sampler
    yields one of them per image. Seeded by (seed, epoch): reproducible, and different each epoch.
    """

    def __init__(self, groups: Sequence[Sequence[int]], seed: int = 0) -> None:
        self.groups = [list(g) for g in groups if len(g)]
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.groups), generator=generator).tolist()
        picks = torch.randint(1 << 30, (len(self.groups),), generator=generator).tolist()
        for i in order:
            yield self.groups[i][picks[i] % len(self.groups[i])]
