"""Tests for the built-in synthetic shapes dataset (captioning/data/shapes.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.data.images import Preprocessing, load_image
from captioning.data.shape_scenes import (
    COLORS,
    RGB,
    SHAPES,
    SIZE_RANGE,
    SIZES,
    _layout,
    object_word_alignment,
    shapes_vocabulary,
)
from captioning.data.shapes import ShapesDataModule, ShapesDataset, main
from captioning.data.vocab import Vocabulary, tokenize


def small_dm(**kwargs) -> ShapesDataModule:
    args = dict(batch_size=8, train_size=64, val_size=24, test_size=24)
    return ShapesDataModule(**{**args, **kwargs})


def scenes(dm: ShapesDataModule, split: str = "test", count: int | None = None):
    ds = dm.dataset(split)
    return [ds.scene(i) for i in range(count or len(ds))]


def test_same_seed_gives_identical_items_in_any_access_order():
    a, b = small_dm(seed=3), small_dm(seed=3)
    ds_a, ds_b = a.dataset("test"), b.dataset("test")
    later_first = [ds_b.scene(i) for i in reversed(range(10))][::-1]
    for i, sb in enumerate(later_first):
        sa = ds_a.scene(i)
        assert np.array_equal(sa.pixels, sb.pixels)
        assert sa.objects == sb.objects and sa.captions == sb.captions


def test_different_seeds_and_splits_differ():
    base = scenes(small_dm(seed=0), "test", 10)
    other_seed = scenes(small_dm(seed=1), "test", 10)
    other_split = scenes(small_dm(seed=0), "val", 10)
    for other in (other_seed, other_split):
        assert sum(np.array_equal(x.pixels, y.pixels) for x, y in zip(base, other)) == 0
        assert [x.captions for x in base] != [y.captions for y in other]


def test_eval_batches_follow_the_interface():
    dm = small_dm()
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"images", "captions", "lengths", "image_ids", "references", "objects", "boxes"}
    images, captions, lengths = batch["images"], batch["captions"], batch["lengths"]
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.uint8  # the encoder normalises
    assert captions.dtype == torch.long and lengths.dtype == torch.long
    assert captions.shape[0] == 8 and lengths.shape == (8,)
    assert batch["image_ids"] == list(range(8))
    ds = dm.dataset("val")
    for b in range(8):
        scene = ds.scene(b)
        # the pixels of the very scene the id names
        assert torch.equal(images[b], torch.from_numpy(scene.pixels).permute(2, 0, 1))
        n = int(lengths[b])
        assert (captions[b] != 0).sum() == n and (captions[b, n:] == 0).all()
        assert captions[b, 0] == Vocabulary.bos_id and captions[b, n - 1] == Vocabulary.eos_id
        # eval caption = the first reference; references = all five
        assert dm.vocab.decode(captions[b].tolist()) == batch["references"][b][0].split()
        assert batch["references"][b] == scene.captions and len(scene.captions) == 5
        assert batch["objects"][b] == scene.objects
        for obj in batch["objects"][b]:
            assert set(obj) == {"shape", "color", "size", "box"} and len(obj["box"]) == 4


def test_train_batches_are_shuffled_pairs_with_one_of_the_references():
    dm = small_dm()
    ds = dm.dataset("train")
    seen_ids = []
    for batch in dm.train_dataloader():
        seen_ids += batch["image_ids"]
        for b, i in enumerate(batch["image_ids"]):
            caption = " ".join(dm.vocab.decode(batch["captions"][b].tolist()))
            assert caption in ds.scene(i).captions
    assert sorted(seen_ids) == list(range(64)) and seen_ids != list(range(64))


def test_predict_uses_test_images_without_captions():
    dm = small_dm()
    test_batch = next(iter(dm.test_dataloader()))
    batch = next(iter(dm.predict_dataloader()))
    assert batch["captions"].shape == (8, 0) and (batch["lengths"] == 0).all()
    assert torch.equal(batch["images"], test_batch["images"])
    assert batch["image_ids"] == test_batch["image_ids"]


def test_every_reference_names_every_object_with_its_attributes():
    dm = small_dm(test_size=200)
    for scene in scenes(dm):
        for ref in scene.captions:
            tokens = ref.split()
            align = object_word_alignment(tokens, scene.objects)
            nouns = [align[t] for t, tok in enumerate(tokens) if tok in SHAPES]
            # each object named exactly once, with its own size, colour and shape
            assert sorted(nouns) == list(range(len(scene.objects))), ref
            for obj in scene.objects:
                assert f"{obj['size']} {obj['color']} {obj['shape']}" in ref


def test_objects_are_listed_in_spatial_order_and_captions_say_so():
    dm = small_dm(test_size=200, eval_min_objects=2, eval_max_objects=4)
    for scene in scenes(dm):
        objs, first = scene.objects, scene.captions[0].split()
        named = [object_word_alignment(first, objs)[t] for t, tok in enumerate(first) if tok in SHAPES]
        cx = [(o["box"][0] + o["box"][2]) / 2 for o in objs]
        if "above" in first:  # vertical pair: first object entirely above the second
            assert named == [0, 1] and objs[0]["box"][3] <= objs[1]["box"][1]
        elif len(objs) == 2:  # "to the left of": first entirely left of the second
            assert "left" in first and named == [0, 1] and objs[0]["box"][2] <= objs[1]["box"][0]
        else:  # 3-4 objects: named left to right, centres clearly apart
            assert named == list(range(len(objs))) and "left" in first
            assert all(b - a >= 0.09 for a, b in zip(cx, cx[1:]))


def test_boxes_are_inside_the_image_disjoint_and_drawn_in_their_colour():
    dm = small_dm(test_size=100, noise=1.0)
    palette = np.array([RGB[c] for c in COLORS], dtype=float)
    for scene in scenes(dm):
        boxes = [o["box"] for o in scene.objects]
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            for bx0, by0, bx1, by1 in boxes[i + 1 :]:
                assert x1 <= bx0 or bx1 <= x0 or y1 <= by0 or by1 <= y0
        for obj in scene.objects:
            x0, y0, x1, y1 = (v * 64 for v in obj["box"])
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            patch = scene.pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)
            nearest = COLORS[int(np.argmin(((palette - patch) ** 2).sum(1)))]
            assert nearest == obj["color"], (obj, patch)
            side = obj["box"][2] - obj["box"][0]
            assert (side > 0.25) == (obj["size"] == "large")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_layout_stays_valid_when_rejection_sampling_keeps_failing(n):
    class StuckRng:  # proposes the same spot every time, so every retry collides
        def uniform(self, low, high, size=None):
            return np.full(size, 0.3)

    sides = [SIZE_RANGE["large"][1]] * n
    boxes = _layout(StuckRng(), sides)
    assert len(boxes) == n
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        for bx0, by0, bx1, by1 in boxes[i + 1 :]:
            assert x1 <= bx0 or bx1 <= x0 or y1 <= by0 or by1 <= y0
    cx = sorted((b[0] + b[2]) / 2 for b in boxes)
    assert all(b - a >= 0.1 for a, b in zip(cx, cx[1:]))


def test_noise_zero_gives_a_plain_background():
    scene = scenes(small_dm(noise=0.0), "test", 1)[0]
    mask = np.ones((64, 64), bool)
    for x0, y0, x1, y1 in (o["box"] for o in scene.objects):
        mask[int(y0 * 64) - 1 : int(y1 * 64) + 2, int(x0 * 64) - 1 : int(x1 * 64) + 2] = False
    assert len(np.unique(scene.pixels[mask], axis=0)) == 1
    noisy = scenes(small_dm(noise=1.0), "test", 1)[0]
    assert len(np.unique(noisy.pixels[mask], axis=0)) > 50


def test_object_counts_honour_train_and_eval_limits():
    dm = small_dm(min_objects=2, max_objects=3, eval_min_objects=4, eval_max_objects=4)
    train_counts = {len(s.objects) for s in scenes(dm, "train")}
    assert train_counts == {2, 3}
    for split in ("val", "test"):
        assert {len(s.objects) for s in scenes(dm, split)} == {4}
    # eval limits default to the training ones
    dm = small_dm(min_objects=1, max_objects=1)
    assert {len(s.objects) for s in scenes(dm, "val")} == {1}


def test_vocabulary_is_fixed_and_covers_every_caption():
    dm = small_dm(test_size=100, train_size=100)
    assert dm.vocab == shapes_vocabulary() == small_dm(seed=7).vocab
    assert set(SHAPES) | set(COLORS) | set(SIZES) <= set(dm.vocab.itos)
    for split in ("train", "test"):
        for scene in scenes(dm, split):
            for ref in scene.captions:
                assert ref.split() == tokenize(ref)  # already tokenised, no punctuation
                assert dm.vocab.unk_id not in dm.vocab.encode(ref.split()), ref


def test_alignment_of_generated_captions():
    objects = [
        {"shape": "circle", "color": "red", "size": "large", "box": [0, 0, 0.3, 0.3]},
        {"shape": "square", "color": "blue", "size": "small", "box": [0.5, 0.5, 0.7, 0.7]},
    ]
    tokens = ["a", "large", "red", "circle", "to", "the", "left", "of", "a", "small", "green", "square"]
    align = object_word_alignment(tokens, objects)
    assert align[1:4] == [0, 0, 0]
    assert align[-1] is None and align[0] is None  # no green square in the scene
    assert object_word_alignment(["a", "square"], objects) == [None, 1]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"min_objects": 3, "max_objects": 2}, ["min_objects", "3", "2"]),
        ({"eval_min_objects": 4, "eval_max_objects": 3}, ["eval_min_objects", "4"]),
        ({"max_objects": 5}, ["max_objects", "5"]),
        ({"eval_min_objects": 0}, ["eval_min_objects", "0"]),
        ({"image_size": 32}, ["image_size", "32"]),
        ({"batch_size": 0}, ["batch_size", "0"]),
        ({"noise": 1.5}, ["noise", "1.5"]),
        ({"train_size": 0}, ["train_size", "0"]),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(kwargs, words):
    with pytest.raises(ValueError) as err:
        ShapesDataModule(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_bigger_images_keep_the_layout():
    dm = small_dm(image_size=96)
    batch = next(iter(dm.test_dataloader()))
    assert batch["images"].shape == (8, 3, 96, 96) and dm.image_size == 96
    assert batch["objects"] == next(iter(small_dm().test_dataloader()))["objects"]


def test_batches_come_at_the_encoder_input_size():
    """Scenes are drawn at the datamodule's size, batches are resized to what the encoder states."""
    from captioning.nn.encoders import SmallCNN

    dm = small_dm()  # draws 64-px scenes
    dm.use_preprocessing(SmallCNN(image_size=80).preprocessing)
    batch = next(iter(dm.test_dataloader()))
    assert batch["images"].shape == (8, 3, 80, 80) and dm.image_size == 80
    red = dm.dataset("test").scene(0).pixels
    resized = np.array(Image.fromarray(red).resize((80, 80), Image.BILINEAR))
    assert torch.equal(batch["images"][0], torch.from_numpy(resized).permute(2, 0, 1))
    dm.use_preprocessing(Preprocessing(64))
    assert next(iter(dm.test_dataloader()))["images"].shape[-1] == 64


def test_export_images_and_command_write_readable_pngs(tmp_path, capsys):
    dm = small_dm()
    paths = dm.export_images("test", [0, 5], tmp_path / "out")
    assert [p.name for p in paths] == ["shapes_test_00000.png", "shapes_test_00005.png"]
    for i, path in zip((0, 5), paths):
        image = load_image(path)
        assert image.size == (64, 64)
        assert np.array_equal(np.asarray(image), dm.dataset("test").scene(i).pixels)
    with pytest.raises(IndexError, match="24"):
        dm.export_images("test", [24], tmp_path)
    main(["--out", str(tmp_path / "cli"), "--count", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and sorted(p.name for p in (tmp_path / "cli").iterdir()) == [
        f"shapes_test_0000{i}.png" for i in range(3)
    ]
    path, caption = lines[0].split("\t")
    assert np.array_equal(np.asarray(load_image(path)), dm.dataset("test").scene(0).pixels)
    assert caption == dm.dataset("test").scene(0).captions[0]


def test_kept_scenes_are_the_drawn_ones_and_items_do_not_share_them():
    vocab = shapes_vocabulary()
    drawn = ShapesDataset("train", 6, vocab, seed=3)
    kept = ShapesDataset("train", 6, vocab, seed=3, keep_scenes=True)
    for i in (0, 5, 0):  # index 0 a second time: read back from memory
        a, b = drawn[i], kept[i]
        assert torch.equal(a["image"], b["image"]) and a["references"] == b["references"]
        assert a["objects"] == b["objects"] and a["boxes"] == b["boxes"]
    assert set(kept.kept) == {0, 5}
    item = kept[0]
    item["image"].zero_()
    item["references"].append("changed")
    item["objects"][0]["box"][0] = -1.0
    again = kept[0]
    assert torch.equal(again["image"], drawn[0]["image"])
    assert again["references"] == drawn[0]["references"] and again["objects"] == drawn[0]["objects"]
    assert ShapesDataModule().dataset("train").kept == {}  # the datamodule keeps scenes by default
    assert ShapesDataModule(keep_scenes=False).dataset("train").kept is None
