"""Test datamodules that ``captioning fit`` runs name by class path (``--data support.datamodules.X``),
in-process or in a subprocess (``tests/`` is on its PYTHONPATH, see :func:`support.cli.cli_env`)."""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset, RandomSampler

from captioning.data.batches import collate_captions as collate
from captioning.data.images import ImageReadError

# Imported at module level on purpose: Lightning records a BatchSampler subclass's init args
# (to rebuild it around a DistributedSampler) only for classes defined before fit starts; a
# class first imported inside train_dataloader() is rebuilt without `lengths` and fails.
from captioning.data.sampling import LengthBucketBatchSampler
from captioning.data.shapes import ShapesDataModule


class BucketedShapes(ShapesDataModule):
    """Shapes whose training batches are bucketed by caption length, wired as captioning/data/coco.py
    does (RandomSampler under LengthBucketBatchSampler): Lightning must shard it under DDP."""

    def train_dataloader(self) -> DataLoader:
        data = self.dataset("train", per_caption=True)
        lengths = [len(data.scene(i).captions[0].split()) for i in range(len(data))]
        batches = LengthBucketBatchSampler(
            RandomSampler(data), self.batch_size, False, lengths=lengths, pool=2, seed=self.seed
        )
        return DataLoader(data, batch_sampler=batches, collate_fn=collate)


class BuggyShapes(ShapesDataModule):
    """A datamodule with a bug (tests/commands/test_cli_errors.py: an internal bug exits 1 with its traceback)."""

    def train_dataloader(self):
        return 1 / 0


class FailingItem(Dataset):
    """``dataset`` whose ``bad_item``-th item fetched in a process (0-based) is an unreadable image."""

    def __init__(self, dataset: Dataset, bad_item: int, image_dir: str) -> None:
        self.dataset, self.bad_item, self.image_dir, self.calls = dataset, bad_item, image_dir, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        self.calls += 1
        if self.calls - 1 == self.bad_item:
            raise ImageReadError(
                f"{self.image_dir}/train_{index:05d}.jpg: not a readable image (OSError: image file is truncated)"
            )
        return self.dataset[index]


class BadImageShapes(ShapesDataModule):
    """Shapes whose ``bad_item``-th training item is an unreadable image (-1: none)."""

    def __init__(self, bad_item: int = -1, image_dir: str = "images", **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad_item, self.image_dir = bad_item, image_dir

    def train_dataloader(self) -> DataLoader:
        train = FailingItem(self.dataset("train", per_caption=True), self.bad_item, self.image_dir)
        return self._loader(train, shuffle=True)
