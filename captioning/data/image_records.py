"""Image records (id, file, reference captions) and the dataset of their items, for every
file-based image datamodule (:mod:`captioning.data.image_captions`).

Paths come from files users hand over, so they are treated as hostile: an image path must
resolve inside its image folder (:func:`image_path`), unless the datamodule allows otherwise.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import Dataset

from captioning.data.images import DEFAULT_MAX_PIXELS, ImageReadError, image_tensor, load_image
from captioning.data.vocab import Vocabulary

log = logging.getLogger(__name__)


def say(msg: str, level: int = logging.INFO) -> None:
    """Log once per job: every DDP rank builds its own datamodule."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        log.log(level, msg)


@dataclass
class ImageRecord:
    """One image: its id, file, and tokenised reference captions (untruncated)."""

    image_id: int | str
    path: str
    captions: list[list[str]]


def image_path(root: str | os.PathLike, relative: object, where: str, allow_outside: bool = False) -> str:
    """``root/relative``, refusing paths that leave ``root`` (``../``, absolute paths, symlinks out).

    Args:
        root: the image folder the annotation file refers to.
        relative: the file name the annotation file gives (anything else is refused).
        where: names the entry in errors, e.g. "captions_train2017.json images[12]".
        allow_outside: accept any path (an explicit option of the datamodule).
    """
    if not isinstance(relative, str) or not relative.strip():
        raise ValueError(f"{where}: image file name must be a non-empty string, got {relative!r}")
    root_path = Path(root)
    path = root_path / relative
    if allow_outside:
        return str(path)
    resolved_root = root_path.resolve()
    resolved = path.resolve()
    if Path(relative).is_absolute() or (resolved != resolved_root and resolved_root not in resolved.parents):
        raise ValueError(
            f"{where}: image path {relative!r} points outside the image folder {root}; refusing it "
            "(set allow_outside_paths: true if the annotation file is yours and this is intended)"
        )
    return str(path)


# ----------------------------------------------------------------------------- dataset and batches
class CaptionDataset(Dataset):
    """Items for training (one per (image, caption) pair) or evaluation (one per image).

    An item is ``{"image": (3, size, size) uint8, "caption": (n+2,) ids, "image_id",
    "references"}``; ``caption`` is the pair's caption (train) or the first reference (eval),
    truncated to ``max_len`` words, or empty when ``with_captions`` is False (predict).
    With ``skip_bad_images`` an image that fails to decode gives ``None`` (dropped by
    :func:`collate_captions`) instead of stopping the run.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        vocab: Vocabulary,
        image_size: int,
        max_len: int,
        per_caption: bool,
        with_captions: bool = True,
        random_flip: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        skip_bad_images: bool = False,
        boxes: dict | None = None,
    ) -> None:
        self.records, self.image_size, self.random_flip = records, image_size, random_flip
        self.boxes = boxes if not per_caption else None  # named boxes per image id (evaluation only)
        self.max_pixels, self.skip_bad_images = max_pixels, skip_bad_images
        self.references = [[" ".join(c) for c in r.captions] for r in records]
        # Encode once here, not per __getitem__: cheap, and workers share it copy-on-write.
        self.encoded = [[vocab.encode(c[:max_len]) for c in r.captions] for r in records]
        self.index: list[tuple[int, int | None]]  # (record, caption or None)
        if per_caption:
            self.index = [(i, j) for i, caps in enumerate(self.encoded) for j in range(len(caps))]
        else:
            self.index = [(i, 0 if with_captions else None) for i in range(len(records))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict[str, Any] | None:
        i, j = self.index[k]
        rec = self.records[i]
        try:
            image = image_tensor(load_image(rec.path, max_pixels=self.max_pixels), self.image_size)
        except ImageReadError as err:
            if not self.skip_bad_images:
                raise
            say(f"skipping an unreadable image: {err}", logging.WARNING)
            return None
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        ids = self.encoded[i][j] if j is not None else []
        item = {
            "image": image,
            "caption": torch.tensor(ids, dtype=torch.long),
            "image_id": rec.image_id,
            "references": self.references[i],
        }
        if self.boxes is not None:
            item["boxes"] = self.boxes.get(rec.image_id, [])
        return item
