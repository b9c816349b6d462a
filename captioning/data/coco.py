"""COCO-format caption data (official COCO captions or a Karpathy split json) as a DataModule.

Two input formats, chosen by which arguments are given:

(a) Official COCO captions, read with ``pycocotools.coco.COCO``:
    ``train_annotations`` / ``val_annotations`` (``captions_train2017.json`` /
    ``captions_val2017.json``) plus ``train_images`` / ``val_images`` (the image folders;
    file = ``<folder>/<file_name>``). ``test_annotations`` is optional: without it the
    **val split is also used as the test split** (COCO test images have no public captions).
    ``test_images`` defaults to ``val_images``. Image id = the file's ``images[].id``.
(b) Karpathy split json (``dataset_coco.json``, ``dataset_flickr8k.json``,
    ``dataset_flickr30k.json``) via ``karpathy_json`` plus ``image_root``; the file of an image
    is ``image_root/filepath/filename`` for COCO, ``image_root/filename`` for Flickr.
    ``restval`` images go to train unless ``restval_to_train=False`` (then they are dropped).
    Image id = ``cocoid`` when the entry has one (COCO), else ``imgid`` (Flickr), else the
    entry's position in ``images`` (these are the ids a feature cache's rows must carry).

Everything else (vocabulary, image checks, batches) is :class:`captioning.data.image_captions.ImageCaptionsDataModule`.
Image paths must stay inside their image folder (``allow_outside_paths`` to allow others).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from captioning.data.image_captions import (  # noqa: F401  (CaptionDataset, collate_captions: re-exported)
    DEFAULT_MAX_PIXELS,
    SPLITS,
    ImageCaptionsDataModule,
    collate_captions,
)
from captioning.data.image_records import CaptionDataset, ImageRecord, image_path  # noqa: F401  (CaptionDataset: re-exported)
from captioning.data.vocab import tokenize


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


def read_coco_captions(
    annotation_file: str | os.PathLike, images_dir: str | os.PathLike, allow_outside_paths: bool = False
) -> list[ImageRecord]:
    """Official COCO captions file (``captions_*.json``) -> records, in the file's image order.

    Read with our own checks rather than ``pycocotools.coco.COCO`` (which trusts the file's
    structure); each ``file_name`` must resolve inside ``images_dir`` (see :func:`image_path`)."""
    path = _require_file(annotation_file, "a COCO captions annotation file (e.g. captions_train2017.json)")
    images_dir = _require_dir(images_dir, f"the image folder for {path.name}")
    data = _read_json(path)
    images, anns = (data.get("images"), data.get("annotations")) if isinstance(data, dict) else (None, None)
    if not isinstance(images, list) or not isinstance(anns, list) or not images or not anns:
        raise ValueError(f"{path}: needs non-empty 'images' and 'annotations' lists (COCO captions format)")
    captions: dict[int | str, list[list[str]]] = {}
    for k, ann in enumerate(anns):
        if not isinstance(ann, dict) or "caption" not in ann:
            raise ValueError(
                f"{path} annotations[{k}]: no 'caption' field; expected a captions file "
                "(captions_*.json), not instances/keypoints annotations"
            )
        if not isinstance(ann["caption"], str):
            raise ValueError(f"{path} annotations[{k}]: caption must be text, got {ann['caption']!r}")
        _check_id(ann.get("image_id"), f"{path} annotations[{k}]")
        captions.setdefault(ann["image_id"], []).append(tokenize(ann["caption"]))
    records, seen = [], set()
    for k, img in enumerate(images):
        where = f"{path} images[{k}]"
        if not isinstance(img, dict):
            raise ValueError(f"{where}: expected an object with id and file_name, got {img!r}")
        img_id = _check_id(img.get("id"), where)
        if img_id in seen:
            raise ValueError(f"{where}: image id {img_id!r} appears twice")
        seen.add(img_id)
        file = image_path(images_dir, img.get("file_name"), f"{where} (id {img_id})", allow_outside_paths)
        records.append(ImageRecord(img_id, file, captions.get(img_id, [])))
    return records


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not valid JSON ({err.__class__.__name__}: {err})") from err


def read_karpathy_json(
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    restval_to_train: bool = True,
    use_provided_tokens: bool = True,
    allow_outside_paths: bool = False,
) -> dict[str, list[ImageRecord]]:
    """Karpathy split json -> {"train", "val", "test"} records (restval -> train or dropped).

    Image id: ``cocoid``, else ``imgid``, else the position in ``images``."""
    path = _require_file(json_file, "a Karpathy split json (dataset_coco.json / dataset_flickr*.json)")
    root = _require_dir(image_root, f"the image root folder for {path.name}")
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: expected an object with an 'images' list (Karpathy split format)")
    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    for i, img in enumerate(data["images"]):
        where = f"{path} images[{i}]"
        try:
            split = img["split"]
            relative = os.path.join(img.get("filepath") or "", img["filename"])
            file = image_path(root, relative, where, allow_outside_paths)
            image_id = img.get("cocoid", img.get("imgid", i))
            caps = [
                _tokens(s["tokens"]) if use_provided_tokens and "tokens" in s else tokenize(s["raw"])
                for s in img["sentences"]
            ]
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{where} lacks a field of the Karpathy format (filename, split, sentences[].tokens/raw): {err!r}"
            ) from err
        _check_id(image_id, where)
        if not isinstance(split, str):
            raise ValueError(f"{where}: split must be a string (train/val/test/restval), got {split!r}")
        if split == "restval":
            if not restval_to_train:
                continue
            split = "train"
        if split not in splits:
            raise ValueError(f"{path}: images[{i}] has split {split!r}; expected train/val/test/restval")
        splits[split].append(ImageRecord(image_id, file, caps))
    return splits


def _tokens(tokens: object) -> list[str]:
    """Karpathy's provided tokens, lowercased and NFKC-normalised like our tokenizer's."""
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise TypeError(f"tokens must be a list of strings, got {tokens!r}")
    return [t for t in tokenize(" ".join(tokens), keep_punctuation=True) if t.strip()]


def _check_id(image_id: object, where: str) -> int | str:
    """An image id as the files may give it: an integer or a string (returned), else a ValueError."""
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
        raise ValueError(f"{where}: image id must be an integer or a string, got {image_id!r}")
    return image_id


# ----------------------------------------------------------------------------- datamodule
class CocoCaptionsDataModule(ImageCaptionsDataModule):
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
            than tokenising ``raw`` with ``captioning.data.vocab.tokenize``.
        The other arguments: see :class:`captioning.data.image_captions.ImageCaptionsDataModule`
        (vocabulary, image checks, loaders). The image size comes from the model's encoder.
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
        coco_args = {
            "train_annotations": train_annotations,
            "val_annotations": val_annotations,
            "test_annotations": test_annotations,
            "train_images": train_images,
            "val_images": val_images,
            "test_images": test_images,
        }
        given = [k for k, v in coco_args.items() if v is not None]
        if karpathy_json is not None and given:
            raise ValueError(
                f"Give either karpathy_json (+ image_root) or the COCO annotation "
                f"arguments, not both (got karpathy_json and {', '.join(given)})"
            )
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
                    f"captions_*.json + image folders); missing: {', '.join(missing)}"
                )
            if image_root is not None:
                raise ValueError(
                    "image_root is only used with karpathy_json; for COCO annotation "
                    "files use train_images / val_images / test_images"
                )

    def read_records(self) -> dict[str, list[ImageRecord]]:
        hp = self.hparams
        outside = self.allow_outside_paths
        if hp.karpathy_json is not None:
            return read_karpathy_json(
                hp.karpathy_json, hp.image_root, hp.restval_to_train, hp.use_provided_tokens, outside
            )
        records = {
            "train": read_coco_captions(hp.train_annotations, hp.train_images, outside),
            "val": read_coco_captions(hp.val_annotations, hp.val_images, outside),
        }
        records["test"] = (
            list(records["val"])
            if hp.test_annotations is None
            else read_coco_captions(hp.test_annotations, hp.test_images or hp.val_images, outside)
        )
        return records

    def describe(self) -> str:
        hp = self.hparams
        return (
            f"Karpathy split {hp.karpathy_json}"
            if hp.karpathy_json is not None
            else f"COCO captions {hp.train_annotations} / {hp.val_annotations}"
        )
