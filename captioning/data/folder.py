"""Your own images: a folder of images plus a CSV or JSONL file of (file, caption) rows.

The captions file has one row per caption; an image with five captions has five rows::

    file,caption,split                      {"file": "dogs/001.jpg", "caption": "a dog runs"}
    dogs/001.jpg,a dog runs on grass,train  {"file": "dogs/001.jpg", "caption": "a brown dog"}
    dogs/001.jpg,a brown dog,train          ...
    cats/7.png,a cat on a sofa,val

* ``file``: path relative to ``image_dir`` (must stay inside it); the image id is this path
  as written (the id a feature cache row must carry).
* ``caption``: the text; tokenised with :func:`captioning.data.vocab.tokenize`.
* split: from a column (``split_column``; values train / val / test, also "valid",
  "validation", "dev", "restval" -> train) or, without one, a seeded random split of the
  *images* (never of rows: all captions of an image stay in one split) by ``val_fraction`` and
  ``test_fraction``.

Column names are options. CSV is read with Python's csv module (quoted fields with commas
or newlines work; UTF-8, a BOM is ignored); JSONL is one JSON object per line. A malformed
row is an error naming the file and line.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from captioning.data.image_captions import (
    DEFAULT_MAX_PIXELS,
    SPLITS,
    ImageCaptionsDataModule,
)
from captioning.data.image_records import ImageRecord, image_path
from captioning.data.vocab import tokenize

SPLIT_NAMES = {
    "train": "train",
    "restval": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
}


def read_caption_rows(
    path: str | Path, file_column: str = "file", caption_column: str = "caption", split_column: str | None = None
) -> list[tuple[str, str, str | None, str]]:
    """Rows of a CSV/JSONL captions file: ``(file, caption, split or None, "path:line")``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected the captions file (CSV or JSONL) there")
    columns = [file_column, caption_column] + ([split_column] if split_column else [])
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err
    rows: list[tuple[str, str, str | None, str]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not a JSON object ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}, line {number}: expected a JSON object with {columns}, got {type(row).__name__}"
                )
            rows.append(_row(row, columns, split_column, f"{path}, line {number}"))
    else:
        reader = csv.DictReader(text.splitlines(keepends=True))
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: the header row {reader.fieldnames} lacks the column(s) {missing} "
                "(set file_column / caption_column / split_column to your names)"
            )
        for row in reader:
            rows.append(_row(row, columns, split_column, f"{path}, line {reader.line_num}"))
    if not rows:
        raise ValueError(f"{path}: no caption rows")
    return rows


def _row(row: dict, columns: list[str], split_column: str | None, where: str) -> tuple[str, str, str | None, str]:
    values: list[str] = []
    for column in columns:
        value = row.get(column)
        if not isinstance(value, str) or (column != columns[1] and not value.strip()):
            raise ValueError(f"{where}: column {column!r} must be non-empty text, got {value!r}")
        values.append(value)
    split = None
    if split_column:
        split = SPLIT_NAMES.get(values[2].strip().lower())
        if split is None:
            raise ValueError(f"{where}: split {values[2]!r} is not one of {sorted(SPLIT_NAMES)}")
    return values[0].strip(), values[1], split, where


class FolderCaptionsDataModule(ImageCaptionsDataModule):
    """A folder of images and a CSV/JSONL captions file (module docstring).

    Args:
        image_dir: the folder the ``file`` column is relative to.
        captions_file: ``.csv`` or ``.jsonl`` file of caption rows.
        file_column, caption_column: column (key) names.
        split_column: column holding train/val/test; None = a seeded split of the images.
        val_fraction, test_fraction: shares of images for val/test without a split column
            (at least one image each when there are 3 or more images).
        split_seed: seed of that split (the same seed gives the same split everywhere).
        The other arguments: see :class:`captioning.data.image_captions.ImageCaptionsDataModule`.
    """

    def __init__(
        self,
        image_dir: str,
        captions_file: str,
        file_column: str = "file",
        caption_column: str = "caption",
        split_column: str | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 0,
        vocab_path: str | None = None,
        min_count: int = 1,
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
        super().__init__(
            vocab_path=vocab_path,
            min_count=min_count,
            max_vocab_size=max_vocab_size,
            max_caption_length=max_caption_length,
            random_flip=random_flip,
            check_images=check_images,
            skip_bad_images=skip_bad_images,
            allow_outside_paths=allow_outside_paths,
            max_pixels=max_pixels,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            bucket_by_length=bucket_by_length,
            instances_file=instances_file,
            boxes_file=boxes_file,
        )
        self.save_hyperparameters()
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must leave images to train on, got {val_fraction} + {test_fraction}"
            )

    def describe(self) -> str:
        return f"{self.hparams.captions_file} (images in {self.hparams.image_dir})"

    def read_records(self) -> dict[str, list[ImageRecord]]:
        hp = self.hparams
        root = Path(hp.image_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such directory; expected the image folder there")
        rows = read_caption_rows(hp.captions_file, hp.file_column, hp.caption_column, hp.split_column)
        by_file: dict[str, ImageRecord] = {}
        split_of: dict[str, str | None] = {}  # None: no split column
        for file, caption, split, where in rows:
            if file not in by_file:
                by_file[file] = ImageRecord(file, image_path(root, file, where, self.allow_outside_paths), [])
                split_of[file] = split
            elif split != split_of[file]:
                raise ValueError(f"{where}: {file} is in split {split_of[file]!r} on an earlier row and {split!r} here")
            by_file[file].captions.append(tokenize(caption))
        assigned: dict[str, str] = (
            self._random_split(list(by_file)) if hp.split_column is None else {f: str(s) for f, s in split_of.items()}
        )
        out: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
        for file, record in by_file.items():
            out[assigned[file]].append(record)
        return out

    def _random_split(self, files: list[str]) -> dict[str, str]:
        hp = self.hparams
        order = sorted(files)
        random.Random(hp.split_seed).shuffle(order)
        n = len(order)
        n_val = max(1, round(n * hp.val_fraction)) if hp.val_fraction > 0 and n >= 3 else 0
        n_test = max(1, round(n * hp.test_fraction)) if hp.test_fraction > 0 and n >= 3 else 0
        split = dict.fromkeys(order[:n_val], "val")
        split.update(dict.fromkeys(order[n_val : n_val + n_test], "test"))
        split.update(dict.fromkeys(order[n_val + n_test :], "train"))
        return split
