"""The two batch layouts every datamodule produces, and the one collate function of each.

Batches stay plain dicts (Lightning moves them to the device key by key, DataLoader workers
pickle them cheaply); :class:`CaptionBatch` and :class:`TextBatch` name their keys and types
so a type checker and a reader see the same contract the models read. The keys in
:data:`METADATA_KEYS` hold plain Python per item (never tensors): the datamodules
(:class:`MovesTensorsOnly`) hand them over as they are instead of walking them for tensors.

Image captions (shapes, COCO, Karpathy, folder, feature cache, cache building) all go through
:func:`collate_captions`; text pairs (TSV, synthetic tasks) through :func:`collate_text`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

PAD_ID = 0  # <pad> of both vocabularies (captioning.data.vocab.Vocabulary.pad_id, text_vocab)


class NamedBox(TypedDict, total=False):
    """A thing the data knows the place of (captioning.eval.localisation): box in [0, 1] image fractions."""

    box: list[float]  # [x0, y0, x1, y1]
    nouns: list[str]  # words that name it ("circle", "dog", "man")
    attributes: list[str]  # words that describe it ("red", "small")


class CaptionBatch(TypedDict, total=False):
    """An image-caption batch of B items (docs/data.md, "Batches").

    Exactly one of ``images`` / ``features`` is present.
    """

    images: Tensor  # (B, 3, H, W) uint8 at the encoder's input size; the encoder normalises
    features: Tensor  # (B, S, C) float16 from a feature cache, in place of images
    captions: Tensor  # (B, L) long: <bos> w1 .. wn <eos>, padded with PAD_ID; (B, 0) for predict
    lengths: Tensor  # (B,) long: tokens per caption
    image_ids: list[Any]  # B ids (int or str, as the data names its images)
    references: list[list[str]]  # B lists of reference captions (space-joined tokens)
    boxes: list[list[NamedBox]]  # B lists of named boxes, when the data knows where things are
    objects: list[list[dict]]  # built-in shapes only: each image's objects (shape, colour, size, box)


class TextBatch(TypedDict, total=False):
    """A source -> target text batch of B pairs (docs/text.md)."""

    source: Tensor  # (B, S) long, padded with PAD_ID
    source_lengths: Tensor  # (B,) long
    target: Tensor  # (B, T) long: <bos> ... <eos>, padded with PAD_ID
    target_lengths: Tensor  # (B,) long
    ids: list[Any]  # B pair ids
    source_text: list[str]  # the source sentences as read
    references: list[str]  # the target sentences as read
    alignments: list[list[int]]  # synthetic tasks only: source position of each target token


# Keys whose values are plain Python per item (ids, texts, boxes), never tensors.
METADATA_KEYS = frozenset({"image_ids", "references", "boxes", "objects", "ids", "source_text", "alignments"})


class MovesTensorsOnly(LightningDataModule):
    """Datamodule mixin: ``transfer_batch_to_device`` moves a batch's tensors and hands its
    metadata (:data:`METADATA_KEYS`) on as it is. Lightning's own mover walks every nested list
    and dict looking for tensors: ~10 ms for a batch of 64 shapes scenes, 4% of a CPU step."""

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if not isinstance(batch, dict) or not batch.keys() & METADATA_KEYS:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        moved = super().transfer_batch_to_device(
            {k: v for k, v in batch.items() if k not in METADATA_KEYS}, device, dataloader_idx
        )
        return {k: batch[k] if k in METADATA_KEYS else moved[k] for k in batch}


def collate_captions(items: Sequence[dict[str, Any] | None]) -> CaptionBatch:
    """Image-caption items -> a :class:`CaptionBatch`.

    Each item has ``image_id`` and any of ``image`` (3, H, W) uint8, ``caption`` (ids, tensor or
    list; absent = empty), ``references``, ``boxes``, ``objects``; a key is in the batch when
    the items have it. ``None`` items (images skipped as unreadable) are dropped.
    """
    kept = [it for it in items if it is not None]
    caps = [torch.as_tensor(it.get("caption", ()), dtype=torch.long) for it in kept]
    batch: CaptionBatch = {
        "captions": (
            pad_sequence(caps, batch_first=True, padding_value=PAD_ID).view(len(caps), -1)
            if caps
            else torch.zeros(0, 0, dtype=torch.long)
        ),
        "lengths": torch.tensor([len(c) for c in caps], dtype=torch.long),
        "image_ids": [it["image_id"] for it in kept],
    }
    if not kept or "image" in kept[0]:
        batch["images"] = (
            torch.stack([it["image"] for it in kept]) if kept else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
        )
    for key in ("references", "boxes", "objects"):
        if kept and key in kept[0]:
            batch[key] = [it[key] for it in kept]
    return batch


def collate_text(items: list[dict[str, Any]]) -> TextBatch:
    """Text pair items -> a :class:`TextBatch`; ``alignments`` only when every item has one."""
    sources = [torch.as_tensor(it["source"], dtype=torch.long) for it in items]
    targets = [torch.as_tensor(it["target"], dtype=torch.long) for it in items]
    batch: TextBatch = {
        "source": pad_sequence(sources, batch_first=True, padding_value=PAD_ID),
        "source_lengths": torch.tensor([len(s) for s in sources], dtype=torch.long),
        "target": pad_sequence(targets, batch_first=True, padding_value=PAD_ID),
        "target_lengths": torch.tensor([len(t) for t in targets], dtype=torch.long),
        "ids": [it["id"] for it in items],
        "source_text": [it["source_text"] for it in items],
        "references": [it["reference"] for it in items],
    }
    if all(it.get("alignment") is not None for it in items):
        batch["alignments"] = [list(it["alignment"]) for it in items]
    return batch


def usable_workers(requested: int) -> int:
    """DataLoader workers that do not starve training: at most one fewer than the cores this
    process may use (``os.sched_getaffinity``), with one line on stderr when the request is cut.
    Four JPEG-decoding workers on a 2-core machine take the cores the training step needs."""
    import os
    import sys

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    usable = min(requested, max(cores - 1, 0))
    if usable < requested:
        print(
            f"note: num_workers {requested} on a machine with {cores} usable cores: using {usable} "
            "(the training process needs a core of its own)",
            file=sys.stderr,
        )
    return usable
