"""Train the decoder from cached encoder features: wraps an image datamodule (shapes, COCO).

Batches carry ``"features"`` (B, S, C) float16 in place of ``"images"``;
:meth:`captioning.models.image_captioner.ImageCaptioner.encode` uses them as they are (cast to the model's
dtype). Every image is encoded once, by the model's own frozen encoder, when the cache is
missing or stale (checked by the encoder's weight hash and the data settings); see
:mod:`captioning.data.feature_cache` for the format and for bringing features from another extractor.

* train: (image, caption) items. ``captions_per_epoch="all"`` visits every pair once per epoch
  (the COCO convention); ``"one"`` visits every image once with a random caption (the shapes
  convention). ``bucket_by_length`` batches captions of similar length (less padding).
  Captions of one image in one batch share its features (read from disk once).
* val/test: one item per image ("captions" = first reference, "references" = all);
  predict: the test images, empty captions. Evaluation batches carry "boxes" (named boxes for
  the localisation metric) when the wrapped datamodule knows where things are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from captioning.data.batches import CaptionBatch, MovesTensorsOnly, collate_captions, usable_workers
from captioning.data.feature_cache import FeatureCache, build_feature_cache, encoder_fingerprint
from captioning.data.images import image_tensor, load_image
from captioning.data.sampling import LengthBucketBatchSampler, OneCaptionPerImageSampler
from captioning.data.vocab import Vocabulary
from captioning.hyperparameters import TypedHyperparameters
from captioning.nn.encoders import encoder_config

SPLITS = ("train", "val", "test")
# Datamodule settings that do not change which images there are or how they look.
_NOT_IMAGE_SETTINGS = {
    "batch_size",
    "num_workers",
    "check_images",
    "skip_bad_images",
    "max_pixels",
    "vocab_path",
    "min_count",
    "max_vocab_size",
    "max_caption_length",
    "seed",
    "use_provided_tokens",
    "bucket_by_length",
    "random_flip",
}


class _Items(Dataset):
    """(cache row, caption ids, image id, references[, named boxes]) items of one split."""

    def __init__(
        self,
        rows: list[int],
        ids: list,
        refs: list[list[str]],
        boxes: list | None,
        encoded: list[list[list[int]]],
        pairs: bool,
        with_captions: bool = True,
    ) -> None:
        self.rows, self.ids, self.refs, self.boxes, self.encoded = rows, ids, refs, boxes, encoded
        self.pairs = pairs
        self.index = (
            [(i, j) for i, caps in enumerate(encoded) for j in range(len(caps))]
            if pairs
            else [(i, 0 if with_captions else None) for i in range(len(rows))]
        )

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        i, j = self.index[k]
        item = {
            "row": self.rows[i],
            "caption": self.encoded[i][j] if j is not None else [],
            "image_id": self.ids[i],
            "references": self.refs[i],
        }
        if self.boxes is not None and not self.pairs:
            item["boxes"] = self.boxes[i]
        return item


class _Collate:
    """Items -> batch; the features of the batch's images are read in one sorted pass."""

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache

    def __call__(self, items: list[dict]) -> CaptionBatch:
        batch = collate_captions(items)
        batch["features"] = self.cache.read([it["row"] for it in items])  # (B, S, C) float16
        return batch


class _ImageFiles(Dataset):
    """Per-image loader for building a cache from files: (image_id, path) records."""

    def __init__(self, records: list[tuple[Any, str]], image_size: int, max_pixels: int | None = None) -> None:
        self.records, self.image_size, self.max_pixels = records, image_size, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, k: int) -> dict:
        image_id, path = self.records[k]
        return {
            "image": image_tensor(load_image(path, max_pixels=self.max_pixels), self.image_size),
            "image_id": image_id,
        }


class CachedFeaturesDataModule(TypedHyperparameters, MovesTensorsOnly, LightningDataModule):
    """Cached-feature batches for an image datamodule.

    Args:
        data: the image datamodule (e.g. ShapesDataModule, CocoCaptionsDataModule): source of
            the images (to build the cache), captions and vocabulary.
        cache_dir: cache root: ``<cache_dir>/<split>/`` per split, or one folder for all.
        build: build missing or stale caches with the model's encoder (prepare_data, rank 0);
            False: use the folders as they are (e.g. features from another extractor).
        batch_size, num_workers: of these loaders; batch_size None = the wrapped datamodule's.
        captions_per_epoch: "all" (every (image, caption) pair) or "one" (a random caption
            per image) per training epoch.
        bucket_by_length: train batches of similar caption lengths.
        max_caption_length: words kept per caption (before bos/eos).
        build_batch_size: images per encoder call while building.
        seed: shuffling seed.
    """

    def __init__(
        self,
        data: LightningDataModule,
        cache_dir: str,
        build: bool = True,
        batch_size: int | None = None,
        num_workers: int = 0,
        captions_per_epoch: str = "all",
        bucket_by_length: bool = True,
        max_caption_length: int = 50,
        build_batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if captions_per_epoch not in ("all", "one"):
            raise ValueError(f"captions_per_epoch must be 'all' or 'one', got {captions_per_epoch!r}")
        # The wrapped image datamodule (shapes, COCO, folder): typed loosely, it is asked for what it has.
        self.data: Any = data
        self.cache_dir, self.build = Path(cache_dir), build
        self.batch_size: int = batch_size or int(getattr(data, "batch_size", 32))
        self.num_workers, self.captions_per_epoch = usable_workers(num_workers), captions_per_epoch
        self.bucket_by_length, self.max_caption_length = bucket_by_length, max_caption_length
        self.build_batch_size, self.seed = build_batch_size, seed
        self._items: dict[str, _Items] = {}
        self._caches: dict[str, FeatureCache] = {}

    # ------------------------------------------------------------------ pass-through
    @property
    def vocab_data(self) -> dict:
        """The vocabulary as plain data: what the CLI links into ``model.init_args.vocab``."""
        return self.vocab.to_dict()

    @property
    def vocab(self) -> Vocabulary:
        return self.data.vocab

    def describe(self) -> str:
        inner = self.data.describe() if hasattr(self.data, "describe") else type(self.data).__name__
        return f"{inner}, features cached in {self.cache_dir}"

    def example(self, split: str = "val") -> dict | None:
        """The wrapped datamodule's example image (model cards), when it has images."""
        return self.data.example(split) if hasattr(self.data, "example") else None

    # ------------------------------------------------------------------ caches
    def cache_path(self, split: str) -> Path:
        """``<cache_dir>/<split>`` if it (or nothing) is there, else the shared ``<cache_dir>``."""
        per_split = self.cache_dir / split
        shared = (self.cache_dir / "index.json").is_file()
        return self.cache_dir if shared and not per_split.exists() else per_split

    def _source(self) -> dict:
        """The wrapped datamodule and the settings that change its images (not loader settings)."""
        hp = {k: v for k, v in dict(getattr(self.data, "hparams", {})).items() if k not in _NOT_IMAGE_SETTINGS}
        cls = type(self.data)
        init_args = json.loads(json.dumps(hp, default=str))  # as index.json stores it
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}

    def _stale(self, split: str, encoder: torch.nn.Module | None) -> str | None:
        """Why the cache of ``split`` cannot be used with this encoder and data (None: it can)."""
        path = self.cache_path(split)
        if not (path / "index.json").is_file():
            return f"no cache at {path}"
        index = json.loads((path / "index.json").read_text())
        if encoder is not None and index.get("encoder_sha1") not in (None, encoder_fingerprint(encoder)):
            return f"{path} was built by a different encoder (weights hash differs)"
        config = encoder_config(encoder) if encoder is not None else None
        if config is not None and index.get("encoder") not in (None, config):
            return f"{path} was built by a differently configured encoder ({index.get('encoder')})"
        if "source" in index and index["source"] != self._source():
            return f"{path} was built from different data settings"
        return None

    def build_cache(
        self, encoder: torch.nn.Module, force: bool = False, device: str | torch.device | None = None
    ) -> dict[str, FeatureCache]:
        """Encode each split's images once with ``encoder`` (frozen) unless a valid cache exists."""
        out = {}
        preprocessing = getattr(encoder, "preprocessing", None)
        if preprocessing is not None and hasattr(self.data, "use_preprocessing"):
            self.data.use_preprocessing(preprocessing)  # images at the encoder's input size
        for split in SPLITS:
            reason = "forced" if force else self._stale(split, encoder)
            if reason is not None:
                rank_zero_info(f"Building the {split} feature cache ({reason})")
                loader, count = self._image_batches(split)
                build_feature_cache(
                    encoder, loader, count, self.cache_dir / split, device=device, source=self._source()
                )
            out[split] = FeatureCache(self.cache_path(split))
        return out

    def _image_batches(self, split: str) -> tuple[DataLoader, int]:
        """One item per image of ``split`` from the wrapped datamodule, as image batches."""
        kw: dict[str, Any] = dict(batch_size=self.build_batch_size, shuffle=False, num_workers=self.num_workers)
        if hasattr(self.data, "image_records"):  # COCO-style: files on disk
            dataset = _ImageFiles(
                self.data.image_records(split), self.data.image_size, getattr(self.data, "max_pixels", None)
            )
            return DataLoader(dataset, collate_fn=collate_captions, **kw), len(dataset)
        if hasattr(self.data, "dataset") and hasattr(self.data, "train_dataloader"):  # shapes: generated
            dataset = self.data.dataset(split)  # eval dataset: one item per image, all references
            return DataLoader(dataset, collate_fn=collate_captions, **kw), len(dataset)
        raise TypeError(
            f"cannot list the images of {type(self.data).__name__}: it needs image_records(split) "
            "or dataset(split); build the cache yourself (captioning.data.feature_cache.write_feature_cache)"
        )

    def prepare_data(self) -> None:
        if not self.build:
            return
        model = getattr(getattr(self, "trainer", None), "lightning_module", None)
        encoder = getattr(model, "encoder", None)
        if encoder is None:
            raise RuntimeError(
                "CachedFeaturesDataModule: no model encoder to build the cache with; "
                "call build_cache(encoder) first or set build=False"
            )
        if any(self._stale(s, encoder) for s in SPLITS):
            self.build_cache(encoder)

    # ------------------------------------------------------------------ datasets
    def setup(self, stage: str | None = None) -> None:
        model = getattr(getattr(self, "trainer", None), "lightning_module", None)
        for split in SPLITS:
            if split in self._items:
                continue
            cache = self._caches[split] = FeatureCache(self.cache_path(split))
            if model is not None:
                _check_model(model, cache)
            self._items[split] = self._make_items(split, cache)

    def _make_items(self, split: str, cache: FeatureCache) -> _Items:
        if hasattr(self.data, "references"):  # authoritative split membership (COCO, folder)
            by_id = self.data.references(split)
            ids = list(by_id)
            refs = [by_id[i] for i in ids]
            known = self.data.boxes(split) if hasattr(self.data, "boxes") else None
            boxes = [known.get(i, []) for i in ids] if known is not None else None
        elif cache.captions and cache.captions.get("references"):  # captured while building (shapes)
            from captioning.data.shape_scenes import named_boxes

            captured, objs = cache.captions["references"], cache.captions.get("objects") or {}
            ids = [i for i in cache.image_ids if str(i) in captured]
            refs = [captured[str(i)] for i in ids]
            boxes = [named_boxes(objs.get(str(i)) or []) for i in ids] if objs else None
        else:
            raise ValueError(
                f"{cache.path}: no captions.json and {type(self.data).__name__} has no "
                "references(split): nothing to train on"
            )
        ids, refs, boxes = _in_cache(cache, split, ids, refs, boxes)
        vocab, n = self.vocab, self.max_caption_length
        encoded = [[vocab.encode(r.split()[:n]) for r in rs] for rs in refs]
        return _Items(cache.rows_of(ids), ids, refs, boxes, encoded, pairs=split == "train")

    def caption_references(self, split: str) -> dict:
        """``{image_id: [reference, ...]}`` of the images of ``split`` that the cache holds
        (self-critical training's reward corpus)."""
        if split not in self._items:
            self.setup()
        items = self._items[split]
        return dict(zip(items.ids, items.refs))

    def _loader(self, split: str, **kw: Any) -> DataLoader:
        if split not in self._items:
            self.setup()
        return DataLoader(
            self._items[split],
            collate_fn=_Collate(self._caches[split]),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kw,
        )

    def train_dataloader(self) -> DataLoader:
        if "train" not in self._items:
            self.setup()
        items = self._items["train"]
        # (training items are one per caption: j is set)
        lengths = [len(items.encoded[i][j or 0]) for i, j in items.index] if self.bucket_by_length else None
        if self.captions_per_epoch == "one":
            groups: list[list[int]] = [[] for _ in items.rows]
            for k, (i, _) in enumerate(items.index):
                groups[i].append(k)
            # Shards itself under DDP (a DistributedSampler Lightning keeps) and buckets by length.
            per_image = OneCaptionPerImageSampler(groups, seed=self.seed, lengths=lengths, batch_size=self.batch_size)
            return self._loader("train", sampler=per_image, batch_size=self.batch_size)
        sampler = RandomSampler(items, generator=torch.Generator().manual_seed(self.seed))
        if lengths is None:
            return self._loader("train", sampler=sampler, batch_size=self.batch_size)
        # Under DDP Lightning puts a DistributedSampler under the bucketing batch sampler.
        batches = LengthBucketBatchSampler(sampler, self.batch_size, False, lengths=lengths, seed=self.seed)
        return self._loader("train", batch_sampler=batches)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", batch_size=self.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", batch_size=self.batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if "test" not in self._items:
            self.setup()
        t = self._items["test"]
        items = _Items(t.rows, t.ids, t.refs, None, t.encoded, pairs=False, with_captions=False)
        return DataLoader(
            items,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=_Collate(self._caches["test"]),
            num_workers=self.num_workers,
        )


ID_RULES = (
    "the ids are: COCO annotation files: images[].id; Karpathy json: cocoid, else imgid, else the "
    "position in 'images'; folder + CSV/JSONL: the file path as written in the captions file; "
    "built-in shapes: the index in the split (see docs/feature_cache.md)"
)


def _in_cache(cache: FeatureCache, split: str, ids: list, refs: list, boxes: list | None) -> tuple:
    """Keep the images the cache has rows for; a few missing: warn; most missing: a clear error."""
    present = [k for k, i in enumerate(ids) if i in cache.row]
    if len(present) == len(ids):
        return ids, refs, boxes
    missing = [ids[k] for k in range(len(ids)) if ids[k] not in cache.row]
    shown = ", ".join(repr(i) for i in missing[:5])
    if len(present) < len(ids) / 2:
        held = ", ".join(repr(i) for i in cache.image_ids[:5])
        raise KeyError(
            f"{split} split: {len(missing)} of {len(ids)} image ids are not in the feature cache "
            f"{cache.path} (e.g. {shown}); it holds {len(cache)} ids such as {held}. Each row of "
            f"features.npy must carry the id the datamodule gives the image: {ID_RULES}"
        )
    rank_zero_warn(
        f"{split} split: {len(missing)} of {len(ids)} images have no row in the feature cache "
        f"{cache.path} and are left out (e.g. {shown})"
    )
    keep = lambda seq: [seq[k] for k in present]  # noqa: E731
    return keep(ids), keep(refs), keep(boxes) if boxes is not None else None


def _check_model(model: Any, cache: FeatureCache) -> None:
    """The model must take these features: frozen encoder (else it would not train), same grid/C."""
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return
    if any(p.requires_grad for p in encoder.parameters()):
        raise ValueError(
            f"the model's {type(encoder).__name__} is trainable, but training from cached features "
            f"({cache.path}) never updates it: freeze it (ImageEncoder trainable_from: null)"
        )
    grid, channels = getattr(encoder, "grid_size", None), getattr(encoder, "out_channels", None)
    if (grid is not None and cache.grid != (grid, grid)) or (channels is not None and cache.channels != channels):
        raise ValueError(
            f"{cache.path} holds {cache.grid[0]}x{cache.grid[1]}x{cache.channels} features but the "
            f"model's encoder makes {grid}x{grid}x{channels}"
        )
