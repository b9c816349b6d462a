"""Training samplers: length-bucketed batches, and one random caption per image per epoch.

A batch is decoded for as many steps as its longest caption, so a random batch pays for the
padding of its short captions. :class:`LengthBucketBatchSampler` takes the (shuffled) order
of any sampler, sorts pools of ``pool`` batches by caption length, cuts them into batches and
shuffles the batch order: batches hold captions of similar length, yet every epoch differs.
It follows ``BatchSampler``'s API (sampler, batch_size, drop_last) so Lightning can put a
DistributedSampler under it for DDP.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler, Sampler


class LengthBucketBatchSampler(BatchSampler):
    """Batches of similar-length items.

    Args:
        sampler: gives the item order (e.g. RandomSampler); sorting happens within pools.
        batch_size, drop_last: as for BatchSampler.
        lengths: length of every item of the dataset (indexed like the dataset).
        pool: batches per sorting pool (larger = less padding, less randomness).
        seed: seeds the batch order (with the epoch, see set_epoch).
    """

    def __init__(
        self,
        sampler: Sampler | Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        lengths: Sequence[int] = (),
        pool: int = 50,
        seed: int = 0,
    ) -> None:
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
            chunk = order[start : start + size]
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]


class OneCaptionPerImageSampler(DistributedSampler):
    """Each epoch: every image once, in random order, with one of its captions at random.

    ``groups[i]`` lists the dataset indices of image i's (image, caption) items; the sampler
    yields one of them per image. Seeded by (seed, epoch): reproducible, and different each
    epoch (Lightning calls ``set_epoch``).

    It is a :class:`DistributedSampler` that shards itself: under DDP each of the N processes
    gets a different 1/N of the images (padded by repeating, as DistributedSampler does), and
    Lightning keeps it instead of replacing it with a plain sampler over all captions. With
    ``lengths`` and ``batch_size`` the shard is also ordered into length buckets: consecutive
    runs of ``batch_size`` indices (what DataLoader(batch_size=...) groups) hold captions of
    similar length, the batches in random order and the one short batch last.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[int]],
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        batch_size: int | None = None,
        pool: int = 50,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        # Not calling DistributedSampler.__init__: it needs a dataset and an initialised process group.
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas or (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in [0, {self.num_replicas})")
        if lengths is not None and not batch_size:
            raise ValueError("length bucketing needs batch_size")
        self.groups = [list(g) for g in groups if len(g)]
        self.lengths = None if lengths is None else torch.as_tensor(list(lengths))
        self.batch_size, self.pool = batch_size, pool
        self.seed, self.epoch, self.shuffle, self.drop_last = seed, 0, True, False
        self.num_samples = -(-len(self.groups) // self.num_replicas)  # ceil
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.groups), generator=generator).tolist()
        picks = torch.randint(1 << 30, (len(self.groups),), generator=generator).tolist()
        items = [self.groups[i][picks[i] % len(self.groups[i])] for i in order]
        items += items[: self.total_size - len(items)]  # pad so every rank has as many
        shard = items[self.rank : self.total_size : self.num_replicas]
        if self.lengths is None:
            return iter(shard)
        return iter(self._bucketed(shard, generator))

    def _bucketed(self, shard: list[int], generator: torch.Generator) -> list[int]:
        assert self.lengths is not None and self.batch_size is not None  # checked in __init__
        lengths, b = self.lengths, self.batch_size
        size = b * self.pool
        order = torch.as_tensor(shard, dtype=torch.long)
        full: list[list[int]] = []
        short: list[list[int]] = []
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
            for i in range(0, len(chunk), b):
                (full if len(chunk[i : i + b]) == b else short).append(chunk[i : i + b].tolist())
        batches = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()] + short
        return [i for batch in batches for i in batch]
