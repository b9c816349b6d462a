"""Feature cache: encode every image ONCE with a frozen encoder, then train the decoder from disk.

With a frozen encoder, encoding the same image again every epoch (and once per caption) is
wasted work: build the cache once, and :class:`captioning.data.cached.CachedFeaturesDataModule`
serves batches that carry ``"features"`` (B, S, C) instead of ``"images"``
(:meth:`captioning.models.image_captioner.ImageCaptioner.encode` uses them when present).

Cache format: one folder per split (``<cache_dir>/train``, ``/val``, ``/test``), or one
folder shared by every split (``<cache_dir>`` itself; rows are looked up by image id):

* ``features.npy``: a NumPy array (N, H, W, C), float16 (any float dtype is accepted when
  reading), opened memory-mapped. Row i holds the grid features of ``image_ids[i]``; the
  H x W positions are row-major (y, then x), i.e. exactly the encoder's (S = H*W, C) output.
* ``index.json``: ``{"image_ids": [...]}`` (ints or strings, one per row, unique). Caches
  built here also record ``format``, ``grid`` [H, W], ``channels``, ``dtype``, the encoder
  (``encoder``: its {"class_path", "init_args"}, ``encoder_sha1``: a hash of its weights),
  ``image_size`` and ``source`` (the datamodule and its settings), so a stale cache is
  detected instead of silently reused.
* ``captions.json`` (optional): ``{"references": {id: [caption, ...]}, "objects": {id: [...]}}``
  captured while building (the built-in dataset renders an image to know its captions);
  without it the references come from the datamodule's ``references(split)``.

Bring your own grid features (from any extractor): write ``features.npy`` (N, H, W, C) and
``index.json`` with the image ids, e.g. with :func:`write_feature_cache`, and point the cached
datamodule at the folder. To caption raw images later, the checkpoint's encoder must be the
one that made the features (same grid H = W = grid_size, same C = out_channels).

Command line: ``captioning cache-features --config configs/shapes_cached.yaml`` builds the
caches with the config's model encoder (training builds them too when missing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from captioning.io.outputs import current_umask
from captioning.nn.encoders import encoder_config

FORMAT = "captioning-features/1"
FEATURES_FILE, INDEX_FILE, CAPTIONS_FILE = "features.npy", "index.json", "captions.json"
CACHE_FILES = {FEATURES_FILE, INDEX_FILE, CAPTIONS_FILE}


class FeatureCache:
    """Read side of a cache folder; the array is memory-mapped lazily (per worker process).

    Attributes: ``image_ids`` (list), ``row`` ({image_id: row}), ``grid`` (H, W), ``channels``,
    ``index`` (the parsed index.json), ``captions`` (parsed captions.json or None).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index_file, features_file = self.path / INDEX_FILE, self.path / FEATURES_FILE
        for f in (index_file, features_file):
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f}: missing; a feature cache folder needs {FEATURES_FILE} (N, H, W, C) "
                    f"and {INDEX_FILE} with the image ids (see captioning/data/feature_cache.py)"
                )
        try:
            self.index = json.loads(index_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{index_file}: not valid JSON ({err})") from err
        ids = self.index.get("image_ids") if isinstance(self.index, dict) else None
        if not isinstance(ids, list):
            raise ValueError(f"{index_file}: needs an 'image_ids' list (one id per row of {FEATURES_FILE})")
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, (int, str))]
        if bad:
            raise ValueError(f"{index_file}: image ids must be integers or strings, got {bad[0]!r}")
        try:
            array = np.load(features_file, mmap_mode="r", allow_pickle=False)
        except Exception as err:  # noqa: BLE001 - a damaged header fails in many ways inside numpy
            raise ValueError(f"{features_file}: not a readable .npy array ({err.__class__.__name__}: {err})") from err
        if array.ndim != 4 or not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{features_file}: expected a float array (N, H, W, C), got {array.dtype} {array.shape}")
        if array.shape[0] != len(ids):
            raise ValueError(f"{features_file} has {array.shape[0]} rows but {index_file} lists {len(ids)} image ids")
        self.image_ids = ids
        self.row = {i: r for r, i in enumerate(ids)}
        if len(self.row) != len(ids):
            raise ValueError(f"{index_file}: image ids are not unique")
        self.grid, self.channels = (int(array.shape[1]), int(array.shape[2])), int(array.shape[3])
        captions_file = self.path / CAPTIONS_FILE
        self.captions = None
        if captions_file.is_file():
            try:
                self.captions = json.loads(captions_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{captions_file}: not valid JSON ({err})") from err
            if not isinstance(self.captions, dict):
                raise ValueError(f"{captions_file}: expected an object with 'references' (and 'objects')")
        self._array: np.ndarray | None = None  # opened on first read, in the reading process
        self._checked: np.ndarray | None = None  # rows this process found finite (FeatureCache._check_finite)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getstate__(self) -> dict:  # DataLoader workers re-open the memory map themselves
        return {**self.__dict__, "_array": None}

    def _check_finite(self, block: Tensor, rows: np.ndarray) -> None:
        """Refuse rows holding NaN or inf, naming the image id; each row is checked the first time
        this process reads it only (the check costs about as much as the read itself)."""
        if self._checked is None:
            self._checked = np.zeros(len(self.image_ids), dtype=bool)
        new = ~self._checked[rows]
        if not new.any():
            return
        fresh = torch.from_numpy(np.flatnonzero(new))
        finite = torch.isfinite(block[fresh]).flatten(1).all(1)
        if not bool(finite.all()):
            bad = int(rows[int(fresh[int((~finite).nonzero()[0])])])
            raise ValueError(
                f"{self.path / FEATURES_FILE}: the features of image id {self.image_ids[bad]!r} (row {bad}) are "
                "NaN or infinite (or too large for float16); rebuild the cache from finite features"
            )
        self._checked[rows[new]] = True

    def rows_of(self, image_ids: Iterable[Any]) -> list[int]:
        """Rows of these image ids; a missing id raises KeyError naming it and the cache."""
        rows = []
        for i in image_ids:
            if i not in self.row:
                raise KeyError(f"image id {i!r} is not in the feature cache {self.path}")
            rows.append(self.row[i])
        return rows

    def read(self, rows: Sequence[int]) -> Tensor:
        """Features of these rows as (n, S, C) float16, each distinct row read from disk once."""
        if self._array is None:
            self._array = np.load(self.path / FEATURES_FILE, mmap_mode="r")
        unique, inverse = np.unique(
            np.asarray(rows, dtype=np.int64), return_inverse=True
        )  # sorted reads; shared rows read once
        block = torch.from_numpy(np.ascontiguousarray(self._array[unique], dtype=np.float16))
        self._check_finite(block, unique)
        block = block.view(len(unique), -1, self.channels)  # (U, S, C), positions row-major
        return block if len(unique) == len(rows) and np.all(unique == rows) else block[torch.from_numpy(inverse)]


def write_feature_cache(
    path: str | os.PathLike,
    image_ids: Sequence[Any],
    features: np.ndarray | Tensor,
    captions: dict | None = None,
    **meta: Any,
) -> FeatureCache:
    """Write a cache folder from an in-memory array (N, H, W, C) (e.g. features from another
    extractor); stored as float16. ``meta`` goes into index.json. Returns the opened cache."""
    array = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    if array.ndim != 4 or array.shape[0] != len(image_ids):
        raise ValueError(f"features must be (N, H, W, C) with N = len(image_ids) = {len(image_ids)}, got {array.shape}")
    check_storable(array, image_ids, 0, str(path))
    with _atomic_dir(Path(path)) as tmp:
        np.save(tmp / FEATURES_FILE, array.astype(np.float16))
        _write_index(tmp, list(image_ids), array.shape, meta, captions)
    return FeatureCache(path)


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: larger values would be stored as inf


def check_storable(features: Any, image_ids: Sequence[Any], offset: int, where: str) -> None:
    """Refuse features that are NaN, infinite or beyond float16's range, naming the image id.

    ``features`` (n, ...) NumPy array or tensor holding rows ``offset .. offset + n`` of ``image_ids``.
    """
    rows = torch.as_tensor(features).reshape(len(features), -1)
    finite = torch.isfinite(rows).all(1)
    in_range = rows.abs().amax(1) <= FLOAT16_MAX if rows.numel() else finite
    ok = finite & in_range
    if bool(ok.all()):
        return
    bad = int((~ok).nonzero()[0])
    what = (
        "NaN or infinite values" if not bool(finite[bad]) else f"values beyond float16's range (|x| > {FLOAT16_MAX:g})"
    )
    raise ValueError(
        f"feature cache {where}: the features of image id {image_ids[offset + bad]!r} hold {what}; "
        "the cache stores float16: fix or rescale the features (e.g. normalise them) first"
    )


def _write_index(folder: Path, ids: list, shape: tuple, meta: dict, captions: dict | None) -> None:
    index = {
        "format": FORMAT,
        "image_ids": [_jsonable_id(i) for i in ids],
        "grid": [int(shape[1]), int(shape[2])],
        "channels": int(shape[3]),
        "dtype": "float16",
        **meta,
    }
    (folder / INDEX_FILE).write_text(json.dumps(index))
    if captions:
        (folder / CAPTIONS_FILE).write_text(json.dumps(captions))


def _jsonable_id(i: Any) -> int | str:
    return int(i) if isinstance(i, (int, np.integer)) or (isinstance(i, Tensor) and i.dim() == 0) else str(i)


@contextlib.contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """Write into a temporary sibling folder, then rename it into place (never a half cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; a cache is shared like any folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        foreign = [p.name for p in path.iterdir() if p.name not in CACHE_FILES] if path.is_dir() else [path.name]
        if foreign:  # never delete what is not a cache of ours
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(
                f"{path} exists and is not a feature cache folder (it holds {foreign[:3]}); "
                "refusing to replace it: choose another cache_dir"
            )
        shutil.rmtree(path)
    os.replace(tmp, path)


def encoder_fingerprint(encoder: nn.Module) -> str:
    """sha1 of the encoder's class, weights and buffers: equal hashes = identical features."""
    h = hashlib.sha1(type(encoder).__qualname__.encode())
    for name, t in encoder.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def build_feature_cache(
    encoder: nn.Module,
    batches: Iterable[dict],
    num_images: int,
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    **meta: Any,
) -> FeatureCache:
    """Encode every image once and write the cache folder ``path``.

    Args:
        encoder: images (B, 3, H, W) -> (B, g*g, C); must be frozen (its features are reused).
        batches: dicts with "images" and "image_ids" (e.g. an image datamodule's per-image
            loader); "references"/"objects" are kept in captions.json when present.
        num_images: total images (rows) the batches hold.
        device: where to encode (default: where the encoder is).
        meta: extra index.json fields (image_size, source, ...).
    """
    if any(p.requires_grad for p in encoder.parameters()):
        raise ValueError(
            f"{type(encoder).__name__} has trainable parameters: cached features would go stale "
            "as it trains; freeze it (ImageEncoder(trainable_from=None)) or encode on the fly"
        )
    grid = int(getattr(encoder, "grid_size"))  # noqa: B009 - an Encoder's int attributes (nn.Module types them as modules)
    channels = int(getattr(encoder, "out_channels"))  # noqa: B009
    was_training, old_device = encoder.training, next(encoder.parameters()).device
    device = torch.device(device) if device is not None else old_device
    encoder.eval().to(device)
    ids: list = []
    captions: dict[str, dict] = {"references": {}, "objects": {}}
    try:
        with _atomic_dir(Path(path)) as tmp:
            array = np.lib.format.open_memmap(
                tmp / FEATURES_FILE, mode="w+", dtype=np.float16, shape=(num_images, grid, grid, channels)
            )
            for batch in batches:
                feats = encoder(batch["images"].to(device, non_blocking=True))  # (B, S, C)
                n = feats.shape[0]
                if len(ids) + n > num_images:
                    raise ValueError(f"the loader yields more than num_images={num_images} images")
                check_storable(feats.float(), [_jsonable_id(i) for i in batch["image_ids"]], 0, str(path))
                array[len(ids) : len(ids) + n] = feats.reshape(n, grid, grid, channels).to(torch.float16).cpu().numpy()
                for j, image_id in enumerate(batch["image_ids"]):
                    key = str(_jsonable_id(image_id))
                    if "references" in batch:
                        captions["references"][key] = batch["references"][j]
                    if "objects" in batch:
                        captions["objects"][key] = batch["objects"][j]
                ids.extend(_jsonable_id(i) for i in batch["image_ids"])
            if len(ids) != num_images:
                raise ValueError(f"the loader yielded {len(ids)} images, expected {num_images}")
            array.flush()
            del array
            meta = {"encoder": encoder_config(encoder), "encoder_sha1": encoder_fingerprint(encoder), **meta}
            _write_index(
                tmp, ids, (num_images, grid, grid, channels), meta, {k: v for k, v in captions.items() if v} or None
            )
    finally:
        encoder.train(was_training).to(old_device)
    return FeatureCache(path)
