"""One batch layout per kind of data: every image datamodule's batches have exactly the keys and
types :class:`CaptionBatch` declares (and go through ``collate_captions``), text batches those
of :class:`TextBatch`."""

import typing

import torch

from captioning.data.batches import METADATA_KEYS, CaptionBatch, TextBatch, collate_captions, collate_text
from captioning.data.cached import CachedFeaturesDataModule
from captioning.data.folder import FolderCaptionsDataModule
from captioning.data.shapes import ShapesDataModule
from captioning.data.text_tasks import SyntheticTextDataModule
from captioning.nn.encoders import SmallCNN

from support.photos import folder_csv, write_photos

CAPTION_KEYS = set(typing.get_type_hints(CaptionBatch))
TEXT_KEYS = set(typing.get_type_hints(TextBatch))


def _check_caption_batch(batch: dict, pixels: str, with_boxes: bool) -> None:
    assert set(batch) <= CAPTION_KEYS, set(batch) - CAPTION_KEYS
    assert {"captions", "lengths", "image_ids", pixels} <= set(batch)
    assert ({"images", "features"} & set(batch)) == {pixels}  # exactly one of the two
    b = len(batch["image_ids"])
    assert batch["captions"].dtype == torch.long and batch["captions"].shape[0] == b
    assert torch.equal(batch["lengths"], (batch["captions"] != 0).sum(1))
    if pixels == "images":
        assert batch["images"].dtype == torch.uint8 and batch["images"].shape[:2] == (b, 3)
    else:
        assert batch["features"].dtype == torch.float16 and batch["features"].shape[0] == b
    assert ("boxes" in batch) == with_boxes
    if with_boxes:
        assert len(batch["boxes"]) == b and all({"box", "nouns"} <= set(nb) for bx in batch["boxes"] for nb in bx)


def _shapes(**kw):
    return ShapesDataModule(**{"batch_size": 4, "train_size": 8, "val_size": 4, "test_size": 4, **kw})


def test_shapes_batches_follow_the_caption_layout():
    dm = _shapes()
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert loader.collate_fn is collate_captions
        _check_caption_batch(next(iter(loader)), "images", with_boxes=True)


def test_file_datamodule_batches_follow_the_caption_layout(tmp_path):
    photos = write_photos(tmp_path)
    dm = FolderCaptionsDataModule(str(tmp_path), str(folder_csv(tmp_path, photos)), split_column="split", batch_size=2)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert loader.collate_fn is collate_captions
        _check_caption_batch(next(iter(loader)), "images", with_boxes=False)


def test_cached_batches_follow_the_caption_layout_with_features(tmp_path):
    dm = CachedFeaturesDataModule(_shapes(), str(tmp_path / "cache"), batch_size=4)
    dm.build_cache(SmallCNN(channels=8, grid_size=2, width=4).requires_grad_(False))
    dm.setup()
    _check_caption_batch(next(iter(dm.train_dataloader())), "features", with_boxes=False)
    _check_caption_batch(next(iter(dm.val_dataloader())), "features", with_boxes=True)


def test_collate_captions_keeps_only_keys_the_items_have_and_drops_skipped_items():
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    batch = collate_captions(
        [
            {"image": image, "image_id": 7, "caption": [1, 5, 2]},
            None,
            {"image": image, "image_id": 8, "caption": torch.tensor([1, 2])},
        ]
    )
    assert set(batch) == {"images", "captions", "lengths", "image_ids"}
    assert batch["image_ids"] == [7, 8] and batch["captions"].tolist() == [[1, 5, 2], [1, 2, 0]]
    assert batch["lengths"].tolist() == [3, 2]
    no_caption = collate_captions([{"image": image, "image_id": "a.jpg"}])  # cache building, predict
    assert no_caption["captions"].shape == (1, 0) and no_caption["lengths"].tolist() == [0]
    empty = collate_captions([None, None])  # a batch whose images were all unreadable
    assert empty["images"].shape[0] == 0 and empty["captions"].shape == (0, 0)


def test_text_batches_follow_the_text_layout():
    dm = SyntheticTextDataModule(task="dates", train_size=8, val_size=4, test_size=4, batch_size=4)
    loader = dm.train_dataloader()
    assert loader.collate_fn is collate_text
    batch = next(iter(loader))
    assert set(batch) == TEXT_KEYS  # the synthetic tasks know their alignments
    assert batch["source"].dtype == batch["target"].dtype == torch.long
    assert torch.equal(batch["source_lengths"], (batch["source"] != 0).sum(1))
    no_alignment = collate_text(
        [{"source": [4, 5], "target": [1, 6, 2], "id": 0, "source_text": "x y", "reference": "z"}]
    )
    assert "alignments" not in no_alignment and no_alignment["target"].tolist() == [[1, 6, 2]]


def test_metadata_keys_are_exactly_the_batch_keys_that_hold_no_tensors():
    hints = {**typing.get_type_hints(CaptionBatch), **typing.get_type_hints(TextBatch)}
    assert {k for k, t in hints.items() if t is not torch.Tensor} == METADATA_KEYS


def test_datamodules_move_tensors_and_hand_metadata_on_untouched():
    dm = ShapesDataModule(batch_size=4, train_size=8, val_size=4, test_size=4)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)  # "meta": a device that is not the CPU
    assert list(moved) == list(batch)  # same keys, same order
    for key, value in batch.items():
        if key in METADATA_KEYS:
            assert moved[key] is value
        else:
            assert moved[key].device.type == "meta" and moved[key].shape == value.shape
    text = SyntheticTextDataModule(task="reverse", train_size=8, val_size=4, test_size=4, batch_size=4)
    text.setup("fit")
    tb = next(iter(text.val_dataloader()))
    moved = text.transfer_batch_to_device(tb, torch.device("meta"), 0)
    assert moved["source"].device.type == "meta" and moved["ids"] is tb["ids"]


def test_more_workers_than_spare_cores_are_cut_with_one_line(monkeypatch, capsys):
    import os

    from captioning.data.batches import usable_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert usable_workers(4) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_workers 4 on a machine with 2 usable cores: using 1" in err
    assert usable_workers(1) == 1 and usable_workers(0) == 0
    assert capsys.readouterr().err == ""
