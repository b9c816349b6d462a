"""File-based image datamodules treat annotation files and images as hostile: paths stay inside
their image folder, bad images are found at setup (or skipped and counted), and dropped
captions are reported at WARNING level."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from captioning.data.coco import CocoCaptionsDataModule
from captioning.data.folder import FolderCaptionsDataModule
from captioning.data.images import ImageReadError, Preprocessing

from support.photos import folder_csv, karpathy, write_photos


@pytest.fixture
def photos(tmp_path):
    return tmp_path, write_photos(tmp_path)


def _karpathy_dm(root, items, **kw):
    dm = CocoCaptionsDataModule(
        karpathy_json=str(karpathy(root, items)), image_root=str(root), min_count=1, batch_size=4, **kw
    )
    dm.use_preprocessing(Preprocessing(32))
    return dm


def _rewrite(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("bad_name", ["../../../etc/passwd", "/etc/passwd", "../outside.jpg"])
def test_annotation_paths_must_stay_inside_the_image_folder(photos, bad_name):
    root, items = photos
    (root.parent / "outside.jpg").write_bytes((root / items[0].file).read_bytes())
    path = karpathy(root, items)
    _rewrite(path, lambda d: d["images"][3].update(filepath="", filename=bad_name))
    dm = CocoCaptionsDataModule(karpathy_json=str(path), image_root=str(root), min_count=1)
    with pytest.raises(ValueError, match=r"images\[3\].*points outside the image folder") as err:
        dm.vocab
    assert bad_name in str(err.value) and "allow_outside_paths" in str(err.value)


def test_outside_paths_can_be_allowed_explicitly(photos):
    root, items = photos
    outside = root.parent / "elsewhere.jpg"
    outside.write_bytes((root / items[0].file).read_bytes())
    path = karpathy(root, items)
    _rewrite(path, lambda d: d["images"][1].update(filepath="", filename=str(outside)))
    dm = CocoCaptionsDataModule(karpathy_json=str(path), image_root=str(root), min_count=1, allow_outside_paths=True)
    assert str(outside) in [p for _, p in dm.image_records("train")]


def test_official_coco_file_names_are_contained_too(tmp_path):
    (tmp_path / "imgs").mkdir()
    ann = tmp_path / "captions.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "../secret.jpg"}],
                "annotations": [{"id": 1, "image_id": 1, "caption": "a dog"}],
            }
        )
    )
    from captioning.data.coco import read_coco_captions

    with pytest.raises(ValueError, match=r"captions.json images\[0\] \(id 1\): image path '../secret.jpg'"):
        read_coco_captions(ann, tmp_path / "imgs")


def test_a_symlink_out_of_the_image_folder_is_refused(photos):
    root, items = photos
    secret = root.parent / "secret.jpg"
    secret.write_bytes((root / items[0].file).read_bytes())
    (root / "train2014" / "link.jpg").symlink_to(secret)
    path = karpathy(root, items)
    _rewrite(path, lambda d: d["images"][2].update(filename="link.jpg"))
    with pytest.raises(ValueError, match="link.jpg.*points outside"):
        CocoCaptionsDataModule(karpathy_json=str(path), image_root=str(root), min_count=1).vocab


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_image_passes_the_header_check_and_fails_the_full_one(photos):
    root, items = photos
    _truncate(root / items[2].file)
    _karpathy_dm(root, items).setup("fit")  # headers are fine: fast check passes
    with pytest.raises(ImageReadError, match=r"train split: 1 of \d+ image\(s\) cannot be used: .*img_002.jpg") as err:
        _karpathy_dm(root, items, check_images="full").setup("fit")
    assert "skip_bad_images" in str(err.value)


def test_skip_bad_images_drops_and_names_them(photos, caplog):
    root, items = photos
    (root / items[1].file).write_bytes(b"not an image at all")
    _truncate(root / items[2].file)
    dm = _karpathy_dm(root, items, check_images="full", skip_bad_images=True)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipping 2 unusable image(s)" in warning and "img_001.jpg" in warning and "img_002.jpg" in warning
    train_ids = {i for b in dm.train_dataloader() for i in b["image_ids"]}
    assert 5001 not in train_ids and 5002 not in train_ids and 5003 in train_ids


def test_an_image_that_breaks_after_setup_is_skipped_in_the_batch_when_asked(photos, caplog):
    root, items = photos
    dm = _karpathy_dm(root, items, check_images="exists", skip_bad_images=True)
    dm.setup("fit")
    (root / items[3].file).write_bytes(b"broken after setup")
    with caplog.at_level(logging.WARNING):
        ids = [i for b in dm.train_dataloader() for i in b["image_ids"]]
    assert 5003 not in ids and len(ids) > 0
    assert any("img_003" in r.getMessage() for r in caplog.records)


def test_dropped_empty_captions_are_counted_at_warning_level(tmp_path, caplog):
    items = write_photos(tmp_path)
    items[4].captions = ["...", "!!", " "]  # nothing left after tokenising: the image goes too
    items[5].captions[0] = "?!"
    csv = folder_csv(tmp_path, items)
    dm = FolderCaptionsDataModule(str(tmp_path), str(csv), split_column="split")
    with caplog.at_level(logging.WARNING):
        dm.vocab
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "dropped 4 caption(s) that are empty" in warning and "1 image(s) had no caption left" in warning
    assert (
        "train2014/img_004.jpg" not in dm.references("train")
        and len(dm.references("train")["train2014/img_005.jpg"]) == 2
    )


def test_folder_route_reports_a_malformed_row_with_file_and_line(tmp_path):
    items = write_photos(tmp_path)
    csv = folder_csv(tmp_path, items)
    lines = csv.read_text().splitlines()
    lines[3] = "train2014/img_001.jpg"  # no caption column
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"captions.csv, line 4: column 'caption' must be non-empty text"):
        FolderCaptionsDataModule(str(tmp_path), str(csv)).vocab
    jsonl = folder_csv(tmp_path, items, jsonl=True)
    jsonl.write_text(jsonl.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"captions.jsonl, line 40: not a JSON object"):
        FolderCaptionsDataModule(str(tmp_path), str(jsonl)).vocab


def test_seeded_split_keeps_all_captions_of_an_image_together(tmp_path):
    items = write_photos(tmp_path)
    csv = folder_csv(tmp_path, items, with_split=False)
    a = FolderCaptionsDataModule(str(tmp_path), str(csv), val_fraction=0.2, test_fraction=0.2, split_seed=3)
    b = FolderCaptionsDataModule(str(tmp_path), str(csv), val_fraction=0.2, test_fraction=0.2, split_seed=3)
    splits = {s: set(a.references(s)) for s in ("train", "val", "test")}
    assert splits == {s: set(b.references(s)) for s in ("train", "val", "test")}  # same seed, same split
    assert not (splits["train"] & splits["val"]) and not (splits["val"] & splits["test"])
    assert sum(map(len, splits.values())) == len(items) and len(splits["val"]) == len(splits["test"]) == 3
    assert all(len(refs) == 3 for s in splits for refs in a.references(s).values())


def test_exif_rotated_training_photos_are_upright_in_batches(tmp_path):
    """Datamodules load images through the same EXIF-aware path as `caption`."""
    wide = Image.new("RGB", (60, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 30, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    (tmp_path / "i").mkdir()
    wide.save(tmp_path / "i" / "phone.jpg", exif=exif, quality=95)
    (tmp_path / "c.csv").write_text(
        "file,caption,split\ni/phone.jpg,a phone photo,train\ni/phone.jpg,x,train\ni/phone.jpg,a photo,train\n"
    )
    dm = FolderCaptionsDataModule(str(tmp_path), str(tmp_path / "c.csv"), split_column="split", batch_size=1)
    dm.use_preprocessing(Preprocessing(20))
    image = next(iter(dm.train_dataloader()))["images"][0]  # (3, 20, 20): squashed from 20x60 upright
    top, bottom = image[:, 2, 10].tolist(), image[:, 17, 10].tolist()
    assert top[2] > 200 and top[0] < 60  # displayed upright: the blue half is on top
    assert bottom[0] > 200 and bottom[2] < 60
