"""Image files with captions: what every file-based image datamodule shares.

A subclass says where records come from (:meth:`ImageCaptionsDataModule.read_records`:
``{"train"|"val"|"test": [ImageRecord, ...]}``); this base does the rest the same way for
every format (COCO annotation files, Karpathy split json, a folder with a CSV/JSONL file):

* image size from the model's encoder (:attr:`preprocessing`), never an option of its own;
* the vocabulary from the train captions (``min_count``, saved to / reused from ``vocab_path``);
* image checks at setup: headers of every file (fast) or a full decode on request, and
  ``skip_bad_images`` to drop unreadable images with a warning that names the first few;
* the batch layout: train = one item per (image, caption) pair, val/test = one item per image
  (``captions`` = its first reference, ``references`` = all), predict = the test images with
  empty (B, 0) ``captions``. ``images`` are uint8 (B, 3, H, W) at the encoder's input size.

Paths come from files users hand over, so they are treated as hostile: an image path must
resolve inside its image folder (:func:`captioning.data.image_records.image_path`), unless
``allow_outside_paths``. Records and the dataset of their items: :mod:`captioning.data.image_records`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, RandomSampler

from captioning.data.batches import MovesTensorsOnly, collate_captions, usable_workers
from captioning.data.image_records import CaptionDataset, ImageRecord, say
from captioning.data.images import DEFAULT_MAX_PIXELS, FollowsEncoder, ImageReadError, load_image
from captioning.data.sampling import LengthBucketBatchSampler
from captioning.data.vocab import Vocabulary
from captioning.hyperparameters import TypedHyperparameters

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_CHECKS = ("none", "exists", "header", "full")


# ----------------------------------------------------------------------------- datamodule
class ImageCaptionsDataModule(TypedHyperparameters, FollowsEncoder, MovesTensorsOnly, LightningDataModule):
    """Shared machinery of file-based caption datamodules (module docstring).

    Args:
        vocab_path: JSON vocabulary file; loaded if it exists (a resumed run shares the
            vocabulary), else built from the train captions and written there.
        min_count: keep words seen at least this often in the train captions.
        max_vocab_size: cap on non-special words (most frequent kept); None = no cap.
        max_caption_length: captions are truncated to this many words (before bos/eos).
        random_flip: random horizontal flip of train images (mirrors "left"/"right": off by default).
        check_images: at setup, for every image of the splits used: "header" (default: the
            file exists and its header is a readable image within ``max_pixels``; fast),
            "full" (decode every image: slow, catches truncated files), "exists", or "none".
        skip_bad_images: drop images that fail the check (or fail to decode later) with a
            warning naming the first few, instead of stopping with an error.
        allow_outside_paths: accept annotation paths that leave the image folder.
        max_pixels: larger images are refused (decompression bombs); None = Pillow's own limit.
        instances_file: a COCO instances file (``instances_val2014.json``) of the evaluation
            images: their object boxes make ``val/localisation`` (captioning/data/boxes.py).
        boxes_file: or a boxes JSON ``{image_id: [{"word", "box": [x0, y0, x1, y1] fractions}]}``.
        batch_size, num_workers: DataLoader settings (persistent workers when > 0).
        seed: seeds the train shuffling order.
        bucket_by_length: train batches of captions of similar length (less padding).
    """

    def __init__(
        self,
        vocab_path: str | None = None,
        min_count: int = 5,
        max_vocab_size: int | None = None,
        max_caption_length: int = 50,
        random_flip: bool = False,
        check_images: str = "header",
        skip_bad_images: bool = False,
        allow_outside_paths: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        bucket_by_length: bool = False,
        instances_file: str | None = None,
        boxes_file: str | None = None,
    ) -> None:
        super().__init__()
        if instances_file is not None and boxes_file is not None:
            raise ValueError("give instances_file or boxes_file, not both")
        self.instances_file, self.boxes_file = instances_file, boxes_file
        self._boxes: dict | None = None
        for name, value in (
            ("min_count", min_count),
            ("max_caption_length", max_caption_length),
            ("batch_size", batch_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if check_images not in IMAGE_CHECKS:
            raise ValueError(f"check_images must be one of {IMAGE_CHECKS}, got {check_images!r}")
        self.vocab_path, self.min_count, self.max_vocab_size = vocab_path, min_count, max_vocab_size
        self.max_caption_length, self.random_flip = max_caption_length, random_flip
        self.check_images, self.skip_bad_images = check_images, skip_bad_images
        self.allow_outside_paths, self.max_pixels = allow_outside_paths, max_pixels
        self.batch_size, self.num_workers, self.seed = batch_size, usable_workers(num_workers), seed
        self.bucket_by_length = bucket_by_length
        self._records: dict[str, list[ImageRecord]] | None = None
        self._checked: set[str] = set()
        self._vocab: Vocabulary | None = None
        self._datasets: dict[str, CaptionDataset] = {}

    def on_preprocessing_change(self) -> None:
        self._datasets.clear()

    # ------------------------------------------------------------------ to implement
    def read_records(self) -> dict[str, list[ImageRecord]]:
        """``{"train", "val", "test"}`` -> records, in a fixed order (subclasses)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line saying what the data is (model cards, messages)."""
        return type(self).__name__

    # ------------------------------------------------------------------ records
    def _load_records(self) -> dict[str, list[ImageRecord]]:
        if self._records is None:
            records = self.read_records()
            for split in SPLITS:
                empty = [r.image_id for r in records.get(split, []) for c in r.captions if not c]
                for r in records.get(split, []):
                    r.captions = [c for c in r.captions if c]
                kept = [r for r in records.get(split, []) if r.captions]
                if empty:
                    say(
                        f"{split}: dropped {len(empty)} caption(s) that are empty after tokenisation (only "
                        f"punctuation or whitespace), of images {_first(empty)}; "
                        f"{len(records[split]) - len(kept)} image(s) had no caption left",
                        logging.WARNING,
                    )
                records[split] = kept
            if not records["train"]:
                raise ValueError(f"no training images with captions in {self.describe()}")
            say(f"{self.describe()}: " + ", ".join(f"{s} {len(records[s])} images" for s in SPLITS))
            self._records = records
        return self._records

    def _split(self, split: str) -> list[ImageRecord]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self._load_records()[split]

    def image_records(self, split: str) -> list[tuple[int | str, str]]:
        """``[(image_id, image file path), ...]`` of a split (train/val/test), in dataset order."""
        return [(r.image_id, r.path) for r in self._checked_split(split)]

    def references(self, split: str) -> dict[int | str, list[str]]:
        """``{image_id: [reference caption, ...]}`` of a split; captions are space-joined tokens.
        No image is opened (a feature cache needs only the captions)."""
        return {r.image_id: [" ".join(c) for c in r.captions] for r in self._split(split)}

    def caption_references(self, split: str) -> dict[int | str, list[str]]:
        """The references of every image of ``split`` (self-critical training's reward corpus)."""
        return self.references(split)

    def boxes(self, split: str) -> dict | None:
        """Named boxes per image id for the localisation metric, or None without a boxes source."""
        if self.instances_file is None and self.boxes_file is None:
            return None
        if self._boxes is None:
            from captioning.data.boxes import read_boxes_json, read_instances

            source = self.instances_file or self.boxes_file
            assert source is not None
            self._boxes = read_instances(source) if self.instances_file else read_boxes_json(source)
        return self._boxes

    def example(self, split: str = "val") -> dict[str, Any] | None:
        """The first image of ``split`` (PIL), its id and references: shown on model cards."""
        for r in self._checked_split(split)[:10]:
            try:
                return {
                    "image": load_image(r.path, max_pixels=self.max_pixels),
                    "image_id": r.image_id,
                    "references": [" ".join(c) for c in r.captions],
                }
            except ImageReadError:
                continue
        return None

    def _checked_split(self, split: str) -> list[ImageRecord]:
        """The records of ``split`` after the image check (bad ones dropped or an error)."""
        records = self._split(split)
        if split in self._checked or self.check_images == "none":
            return records
        bad = _find_bad_images(records, self.check_images, self.max_pixels)
        if bad:
            shown = "; ".join(list(bad.values())[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
            if not self.skip_bad_images:
                raise ImageReadError(
                    f"{split} split: {len(bad)} of {len(records)} image(s) cannot be used: {shown}. "
                    "Fix or remove them, or set skip_bad_images: true to train without them"
                )
            records = [r for r in records if r.path not in bad]
            self._load_records()[split] = records
            say(f"{split} split: skipping {len(bad)} unusable image(s) (skip_bad_images): {shown}", logging.WARNING)
        self._checked.add(split)
        return records

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_data(self) -> dict:
        """The vocabulary as plain data: what the CLI links into ``model.init_args.vocab``."""
        return self.vocab.to_dict()

    @property
    def vocab(self) -> Vocabulary:
        """Vocabulary of the train captions; loaded from ``vocab_path`` if that file exists.

        Works before ``setup()`` (LightningCLI links it into the model at instantiation).
        """
        if self._vocab is None:
            path = Path(self.vocab_path) if self.vocab_path else None
            if path is not None and path.exists():
                self._vocab = Vocabulary.load(path)
                say(f"Loaded vocabulary ({len(self._vocab)} tokens) from existing {path}; not rebuilt")
            else:
                captions = (c for r in self._split("train") for c in r.captions)
                self._vocab = Vocabulary.build(captions, self.min_count, self.max_vocab_size)
                say(
                    f"Built vocabulary of {len(self._vocab)} tokens from train captions "
                    f"(min_count={self.min_count}, max_vocab_size={self.max_vocab_size})"
                )
                if path is not None:
                    write_json_atomic(path, self._vocab.to_dict())
                    say(f"Saved vocabulary to {path}")
        return self._vocab

    # ------------------------------------------------------------------ datasets and loaders
    def setup(self, stage: str | None = None) -> None:
        """Build the datasets needed for ``stage`` (fit/validate/test/predict; None = all)."""
        by_stage = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        wanted = by_stage.get(stage or "", ["train", "val", "test", "predict"])
        for name in wanted:
            if name in self._datasets:
                continue
            records = self._checked_split("test" if name == "predict" else name)
            self._datasets[name] = CaptionDataset(
                records,
                self.vocab,
                self.image_size,
                self.max_caption_length,
                per_caption=name == "train",
                with_captions=name != "predict",
                random_flip=self.random_flip and name == "train",
                max_pixels=self.max_pixels,
                skip_bad_images=self.skip_bad_images,
                boxes=self.boxes(name) if name in ("val", "test") else None,
            )

    def _dataset(self, name: str) -> CaptionDataset:
        if name not in self._datasets:
            self.setup({"train": "fit", "val": "validate"}.get(name, name))
        return self._datasets[name]

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self._dataset(name),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_captions,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        if not self.bucket_by_length:
            return self._loader("train", shuffle=True)
        # LengthBucketBatchSampler is imported at module level on purpose: Lightning records the
        # init args of BatchSampler subclasses that exist when it calls this hook, which lets it
        # rebuild the sampler with a DistributedSampler underneath under DDP.
        data = self._dataset("train")
        lengths = [len(data.encoded[i][j or 0]) for i, j in data.index]  # training items: one per caption
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(self.seed))
        batches = LengthBucketBatchSampler(sampler, self.batch_size, False, lengths=lengths, seed=self.seed)
        return DataLoader(
            data,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=collate_captions,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)


def _first(items: list, n: int = 5) -> str:
    return ", ".join(map(str, items[:n])) + (f" and {len(items) - n} more" if len(items) > n else "")


def _find_bad_images(records: list[ImageRecord], check: str, max_pixels: int | None) -> dict[str, str]:
    """``{path: "<path>: <reason>"}`` for every record whose image fails ``check``, in record order."""
    from captioning.data.images import check_image_file, verify_image_file

    def problem(record: ImageRecord) -> str | None:
        if check == "exists":
            return None if os.path.isfile(record.path) else f"{record.path}: no such file"
        try:
            (verify_image_file if check == "full" else check_image_file)(record.path, max_pixels=max_pixels)
        except ImageReadError as err:
            message = str(err)
            return message if message.startswith(record.path) else f"{record.path}: {message}"
        return None

    # Header reads are I/O bound: a few threads hide file-system latency (network disks).
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = pool.map(problem, records, chunksize=64)
        return {r.path: p for r, p in zip(records, found) if p is not None}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary sibling and a rename: readers never see half a file (DDP ranks
    may write the same vocabulary at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
