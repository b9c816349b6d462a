"""COCO-format caption data (official COCO captions or a Karpathy split json) as a DataModule.

Two input formats, chosen by which arguments are given:

(a) Official COCO captions, read with ``pycocotools.coco.COCO``:
    ``train_annotations`` / ``val_annotations`` (``captions_train2017.json`` /
    ``captions_val2017.json``) plus ``train_images`` / ``val_images`` (the image folders;
    file = ``<folder>/<file_name>``). ``test_annotations`` is optional: without it the
    **val split is also used as the test split** (COCO test images have no public captions).
    ``test_images`` defaults to ``val_images``.
(b) Karpathy split json (``dataset_coco.json``, ``dataset_flickr8k.json``,
    ``dataset_flickr30k.json``) via ``karpathy_json`` plus ``image_root``; the file of an image
    is ``image_root/filepath/filename`` for COCO, ``image_root/filename`` for Flickr.
    ``restval`` images go to train unless ``restval_to_train=False`` (then they are dropped).

Batches follow INTERFACES.md: train = one item per (image, caption) pair, val/test = one item
per image ("captions" = its first reference, "references" = all), predict = test split images
with empty (B, 0) "captions".
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, RandomSampler

from captioning.images import load_image, to_tensor
from captioning.vocab import Vocabulary, tokenize
from datamodules.sampling import LengthBucketBatchSampler

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _info(msg: str) -> None:
    # Every DDP rank builds its own datamodule; say things once.
    if rank_zero_only.rank == 0:
        log.info(msg)


@dataclass
class ImageRecord:
    """One image: its id, file, and tokenised reference captions (untruncated)."""

    image_id: int | str
    path: str
    captions: list[list[str]]


# ----------------------------------------------------------------------------- readers
def _require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {what} there")
    return path


def _require_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory; expected {what} there")
    return path


def read_coco_captions(annotation_file: str | os.PathLike, images_dir: str | os.PathLike) -> list[ImageRecord]:
    """Official COCO captions file (``captions_*.json``) -> records, in the file's image order."""
    from pycocotools.coco import COCO  # imported here: only this format needs it

    path = _require_file(annotation_file, "a COCO captions annotation file (e.g. captions_train2017.json)")
    images_dir = _require_dir(images_dir, f"the image folder for {path.name}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
            coco = COCO(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    except (AssertionError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a COCO annotation file ({err.__class__.__name__}: {err})") from err
    anns = coco.dataset.get("annotations", [])
    if not coco.imgs or not anns:
        raise ValueError(f"{path}: needs non-empty 'images' and 'annotations' lists (COCO captions format)")
    if "caption" not in anns[0]:
        raise ValueError(f"{path}: annotations have no 'caption' field; expected a captions file "
                         "(captions_*.json), not instances/keypoints annotations")
    records = []
    for img_id in coco.getImgIds():
        img = coco.loadImgs(img_id)[0]
        caps = [tokenize(a["caption"]) for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id))]
        records.append(ImageRecord(img_id, str(images_dir / img["file_name"]), [c for c in caps if c]))
    return records


def read_karpathy_json(json_file: str | os.PathLike, image_root: str | os.PathLike,
                       restval_to_train: bool = True, use_provided_tokens: bool = True,
                       ) -> dict[str, list[ImageRecord]]:
    """Karpathy split json -> {"train", "val", "test"} records (restval -> train or dropped)."""
    path = _require_file(json_file, "a Karpathy split json (dataset_coco.json / dataset_flickr*.json)")
    root = _require_dir(image_root, f"the image root folder for {path.name}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: expected an object with an 'images' list (Karpathy split format)")
    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    for i, img in enumerate(data["images"]):
        try:
            split = img["split"]
            file = root / img.get("filepath", "") / img["filename"]
            image_id = img.get("cocoid", img.get("imgid", i))
            caps = [[t.lower() for t in s["tokens"]] if use_provided_tokens and "tokens" in s
                    else tokenize(s["raw"]) for s in img["sentences"]]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: images[{i}] lacks a field of the Karpathy format "
                             f"(filename, split, sentences[].tokens/raw): {err!r}") from err
        if split == "restval":
            if not restval_to_train:
                continue
            split = "train"
        if split not in splits:
            raise ValueError(f"{path}: images[{i}] has split {split!r}; expected train/val/test/restval")
        splits[split].append(ImageRecord(image_id, str(file), [c for c in caps if c]))
    return splits


# ----------------------------------------------------------------------------- datasets
class CaptionDataset(Dataset):
    """Items for training (one per (image, caption) pair) or evaluation (one per image).

    An item is ``{"image": (3, size, size), "caption": (n+2,) ids, "image_id", "references"}``;
    ``caption`` is the pair's caption (train) or the first reference (eval), truncated to
    ``max_len`` words, or empty when ``with_captions`` is False (predict).
    """

    def __init__(self, records: list[ImageRecord], vocab: Vocabulary, image_size: int,
                 max_len: int, per_caption: bool, with_captions: bool = True,
                 random_flip: bool = False) -> None:
        self.records, self.image_size, self.random_flip = records, image_size, random_flip
        self.references = [[" ".join(c) for c in r.captions] for r in records]
        # Encode once here, not per __getitem__: cheap, and workers share it copy-on-write.
        self.encoded = [[vocab.encode(c[:max_len]) for c in r.captions] for r in records]
        if per_caption:
            self.index = [(i, j) for i, caps in enumerate(self.encoded) for j in range(len(caps))]
        else:
            self.index = [(i, 0 if with_captions else None) for i in range(len(records))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, j = self.index[k]
        rec = self.records[i]
        image = to_tensor(load_image(rec.path), self.image_size)
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        ids = self.encoded[i][j] if j is not None else []
        return {"image": image, "caption": torch.tensor(ids, dtype=torch.long),
                "image_id": rec.image_id, "references": self.references[i]}


def collate_captions(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items -> the INTERFACES.md batch: images (B,3,H,W), captions (B,L) padded with 0, lengths (B,)."""
    caps = [it["caption"] for it in items]
    return {
        "images": torch.stack([it["image"] for it in items]),
        "captions": pad_sequence(caps, batch_first=True, padding_value=Vocabulary.pad_id),
        "lengths": torch.tensor([len(c) for c in caps], dtype=torch.long),
        "image_ids": [it["image_id"] for it in items],
        "references": [it["references"] for it in items],
    }


# ----------------------------------------------------------------------------- datamodule
class CocoCaptionsDataModule(LightningDataModule):
    """COCO captions / Karpathy split data for the image captioner.

    Args:
        karpathy_json: Karpathy split json; selects format (b). Needs ``image_root``.
        image_root: image root for ``karpathy_json`` (COCO: contains train2014/, val2014/).
        train_annotations, val_annotations: official COCO ``captions_*.json``; format (a).
        test_annotations: optional; without it the val split is also the test split.
        train_images, val_images: image folders for format (a).
        test_images: image folder for ``test_annotations``; defaults to ``val_images``.
        restval_to_train: Karpathy ``restval`` images join train (else they are dropped).
        use_provided_tokens: Karpathy format: use ``sentences[].tokens`` (lowercased) rather
            than tokenising ``raw`` with ``captioning.vocab.tokenize``.
        vocab_path: JSON vocabulary file; loaded if it exists (a resumed run shares the
            vocabulary), else built from the train captions and written there.
        min_count: keep words seen at least this often in the train captions.
        max_vocab_size: cap on non-special words (most frequent kept); None = no cap.
        max_caption_length: captions are truncated to this many words (before bos/eos).
        image_size: images are resized to (image_size, image_size).
        random_flip: random horizontal flip of train images. Note it mirrors the scene, so
            captions saying "left"/"right" become wrong; off by default.
        verify_files: at setup, check every image file of the used splits exists (fails early
            naming the missing files instead of mid-epoch).
        batch_size, num_workers: DataLoader settings (persistent workers when > 0).
        seed: seeds the train shuffling order.
        bucket_by_length: train batches of captions of similar length (shuffled pools sorted
            by length, batch order shuffled): fewer padded decode steps per batch.
    """

    def __init__(
        self,
        karpathy_json: str | None = None,
        image_root: str | None = None,
        train_annotations: str | None = None,
        val_annotations: str | None = None,
        test_annotations: str | None = None,
        train_images: str | None = None,
        val_images: str | None = None,
        test_images: str | None = None,
        restval_to_train: bool = True,
        use_provided_tokens: bool = True,
        vocab_path: str | None = None,
        min_count: int = 5,
        max_vocab_size: int | None = None,
        max_caption_length: int = 50,
        image_size: int = 256,
        random_flip: bool = False,
        verify_files: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        bucket_by_length: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        coco_args = {"train_annotations": train_annotations, "val_annotations": val_annotations,
                     "test_annotations": test_annotations, "train_images": train_images,
                     "val_images": val_images, "test_images": test_images}
        given = [k for k, v in coco_args.items() if v is not None]
        if karpathy_json is not None and given:
            raise ValueError(f"Give either karpathy_json (+ image_root) or the COCO annotation "
                             f"arguments, not both (got karpathy_json and {', '.join(given)})")
        if karpathy_json is not None:
            if image_root is None:
                raise ValueError("karpathy_json needs image_root (the folder the image paths are relative to)")
        else:
            needed = ["train_annotations", "val_annotations", "train_images", "val_images"]
            missing = [k for k in needed if coco_args[k] is None]
            if missing:
                raise ValueError(
                    "No COCO data given: set karpathy_json + image_root (Karpathy split json), or "
                    "train_annotations, val_annotations, train_images, val_images (official "
                    f"captions_*.json + image folders); missing: {', '.join(missing)}")
            if image_root is not None:
                raise ValueError("image_root is only used with karpathy_json; for COCO annotation "
                                 "files use train_images / val_images / test_images")
        for name, value in (("min_count", min_count), ("max_caption_length", max_caption_length),
                            ("image_size", image_size), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._records: dict[str, list[ImageRecord]] | None = None
        self._vocab: Vocabulary | None = None
        self._datasets: dict[str, CaptionDataset] = {}

    # ------------------------------------------------------------------ data
    def _load_records(self) -> dict[str, list[ImageRecord]]:
        if self._records is None:
            hp = self.hparams
            if hp.karpathy_json is not None:
                records = read_karpathy_json(hp.karpathy_json, hp.image_root,
                                             hp.restval_to_train, hp.use_provided_tokens)
            else:
                records = {"train": read_coco_captions(hp.train_annotations, hp.train_images),
                           "val": read_coco_captions(hp.val_annotations, hp.val_images)}
                records["test"] = (records["val"] if hp.test_annotations is None else
                                   read_coco_captions(hp.test_annotations, hp.test_images or hp.val_images))
            for split in SPLITS:
                kept = [r for r in records[split] if r.captions]
                if len(kept) < len(records[split]):
                    _info(f"{split}: dropped {len(records[split]) - len(kept)} images without captions")
                records[split] = kept
            if not records["train"]:
                raise ValueError(f"No training images with captions in {self._source()}")
            _info("COCO captions: " + ", ".join(f"{s} {len(records[s])} images" for s in SPLITS))
            self._records = records
        return self._records

    def _source(self) -> str:
        hp = self.hparams
        return hp.karpathy_json if hp.karpathy_json is not None else hp.train_annotations

    def _split(self, split: str) -> list[ImageRecord]:
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}")
        return self._load_records()[split]

    def image_records(self, split: str) -> list[tuple[int | str, str]]:
        """``[(image_id, image file path), ...]`` of a split (train/val/test), in dataset order."""
        return [(r.image_id, r.path) for r in self._split(split)]

    def references(self, split: str) -> dict[int | str, list[str]]:
        """``{image_id: [reference caption, ...]}`` of a split; captions are space-joined tokens."""
        return {r.image_id: [" ".join(c) for c in r.captions] for r in self._split(split)}

    @property
    def vocab(self) -> Vocabulary:
        """Vocabulary of the train captions; loaded from ``vocab_path`` if that file exists.

        Works before ``setup()`` (LightningCLI links it into the model at instantiation).
        """
        if self._vocab is None:
            hp = self.hparams
            path = Path(hp.vocab_path) if hp.vocab_path else None
            if path is not None and path.exists():
                self._vocab = Vocabulary.load(path)
                _info(f"Loaded vocabulary ({len(self._vocab)} tokens) from existing {path}; not rebuilt")
            else:
                captions = (c for r in self._split("train") for c in r.captions)
                self._vocab = Vocabulary.build(captions, hp.min_count, hp.max_vocab_size)
                _info(f"Built vocabulary of {len(self._vocab)} tokens from train captions "
                      f"(min_count={hp.min_count}, max_vocab_size={hp.max_vocab_size})")
                if path is not None:
                    _write_atomic(path, self._vocab.to_dict())
                    _info(f"Saved vocabulary to {path}")
        return self._vocab

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets needed for ``stage`` (fit/validate/test/predict; None = all)."""
        hp = self.hparams
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"],
                  "predict": ["predict"]}.get(stage, ["train", "val", "test", "predict"])
        for name in wanted:
            if name in self._datasets:
                continue
            records = self._split("test" if name == "predict" else name)
            if hp.verify_files:
                _check_files_exist(records, name)
            self._datasets[name] = CaptionDataset(
                records, self.vocab, hp.image_size, hp.max_caption_length,
                per_caption=name == "train", with_captions=name != "predict",
                random_flip=hp.random_flip and name == "train")

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if name not in self._datasets:
            self.setup({"train": "fit", "val": "validate"}.get(name, name))
        generator = torch.Generator().manual_seed(self.hparams.seed) if shuffle else None
        return DataLoader(self._datasets[name], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, collate_fn=collate_captions,
                          persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), generator=generator)

    def train_dataloader(self) -> DataLoader:
        if not self.hparams.bucket_by_length:
            return self._loader("train", shuffle=True)
        # LengthBucketBatchSampler is imported at module level on purpose: Lightning records the
        # init args of BatchSampler subclasses that exist when it calls this hook, which lets it
        # rebuild the sampler with a DistributedSampler underneath under DDP.
        if "train" not in self._datasets:
            self.setup("fit")
        data = self._datasets["train"]
        lengths = [len(data.encoded[i][j]) for i, j in data.index]
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(self.hparams.seed))
        batches = LengthBucketBatchSampler(sampler, self.batch_size, False, lengths=lengths, seed=self.hparams.seed)
        return DataLoader(data, batch_sampler=batches, num_workers=self.num_workers, collate_fn=collate_captions,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)


def _check_files_exist(records: list[ImageRecord], split: str) -> None:
    missing = [r.path for r in records if not os.path.isfile(r.path)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{split} split: {len(missing)} image file(s) missing: {shown}")


def _write_atomic(path: Path, data: dict) -> None:
    # DDP ranks may write the same vocabulary at once; a rename never leaves a half-written
    # file for another rank (or a resumed run) to read.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
