"""benchmarks/digit_scenes.py: the scenes it writes, how it scores captions, and its whole route."""

import importlib.util
import json
import sys

import numpy as np
import pytest
from PIL import Image

from support import ROOT


def _module():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports its sibling real_photos.py
    spec = importlib.util.spec_from_file_location("digit_scenes", ROOT / "benchmarks" / "digit_scenes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _glyphs(count: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """Stand-ins for the scikit-learn digits: a filled block of ink per glyph, labels 0-9 in turn."""
    glyphs = np.zeros((count, 8, 8), dtype=np.float32)
    glyphs[:, 1:7, 2:6] = 1.0
    return glyphs, np.arange(count) % 10


def test_scenes_are_coco_files_whose_captions_name_the_digits_left_to_right(tmp_path):
    ds = _module()
    truth = ds.write_scenes(tmp_path, 60, 10, 12, *_glyphs())
    assert [len(truth[s]) for s in ("train", "val", "test")] == [60, 10, 12]
    for split in ("train", "val", "test"):
        coco = json.loads((tmp_path / f"captions_{split}.json").read_text())
        assert {im["id"] for im in coco["images"]} == set(truth[split])
        for im in coco["images"]:
            objects = truth[split][im["id"]]
            caps = [a["caption"] for a in coco["annotations"] if a["image_id"] == im["id"]]
            assert len(caps) == 5
            expected = [(o["size"], o["digit"]) for o in objects]
            assert all(ds.read_scene(c) == expected for c in caps)  # every reference: left to right
            centres = [(o["box"][0] + o["box"][2]) / 2 for o in objects]
            assert centres == sorted(centres) and len({o["digit"] for o in objects}) == len(objects)
            for o in objects:
                side = o["box"][2] - o["box"][0]
                low, high = ds.SIZES[o["size"]]
                assert low <= side <= high and o["box"][0] >= 0 and o["box"][3] <= 1
            assert Image.open(tmp_path / split / im["file_name"]).size == (ds.SIDE, ds.SIDE)
    # Test scenes show handwriting training never saw.
    assert all(o["glyph"] < ds.TRAIN_GLYPHS for objs in truth["train"].values() for o in objs)
    assert all(o["glyph"] >= ds.TRAIN_GLYPHS for s in ("val", "test") for objs in truth[s].values() for o in objs)
    boxes = json.loads((tmp_path / "boxes.json").read_text())
    assert set(boxes) == {str(i) for s in ("val", "test") for i in truth[s]}  # ids do not collide
    one = next(iter(truth["test"]))
    assert boxes[str(one)][0] == {
        "word": str(truth["test"][one][0]["digit"]),
        "box": list(truth["test"][one][0]["box"]),
        "attributes": [truth["test"][one][0]["size"]],
    }


def test_digit_accuracy_wants_every_digit_in_order_and_sizes_only_for_the_stricter_figure():
    ds = _module()
    truth = {
        1: [{"digit": 3, "size": "small"}, {"digit": 7, "size": "large"}],
        2: [{"digit": 5, "size": "large"}],
    }
    right = {1: "a small 3 to the left of a large 7", 2: "a large 5"}
    assert ds.digit_accuracy(right, truth) == {"digit_accuracy": 1.0, "digit_and_size_accuracy": 1.0}
    wrong_size = {1: "a large 3 to the left of a large 7", 2: "a large 5"}
    assert ds.digit_accuracy(wrong_size, truth) == {"digit_accuracy": 1.0, "digit_and_size_accuracy": 0.5}
    swapped = {1: "a large 7 to the left of a small 3", 2: "a large 5 and a small 1"}
    assert ds.digit_accuracy(swapped, truth) == {"digit_accuracy": 0.0, "digit_and_size_accuracy": 0.0}


def test_localisation_scores_digits_and_size_words_apart():
    import torch

    ds = _module()
    scene = [{"digit": 3, "size": "small", "box": [0.0, 0.0, 0.25, 0.25]}]
    on, off = torch.zeros(4, 4), torch.zeros(4, 4)  # peak on the digit's cell, or the far corner
    on[0, 0], off[3, 3] = 1.0, 1.0
    words = [["a", "small", "3"]]
    size_only = ds.localisation(words, [torch.stack([off, on, off])], [scene])
    assert size_only == {"localisation": 0.5, "localisation_digits": 0.0, "localisation_sizes": 1.0}
    digit_only = ds.localisation(words, [torch.stack([on, off, on])], [scene])
    assert digit_only == {"localisation": 0.5, "localisation_digits": 1.0, "localisation_sizes": 0.0}
    assert ds.localisation([["a", "3"]], [torch.stack([on, on])], [scene])["localisation_sizes"] is None


@pytest.mark.e2e
def test_the_benchmark_trains_through_the_coco_annotations_config_and_writes_its_table(tmp_path, monkeypatch):
    ds = _module()
    monkeypatch.setattr(ds, "load_glyphs", _glyphs)
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\n{ds.BEGIN}\nold\n{ds.END}\n")
    out = tmp_path / "figures.json"
    args = ["--work_dir", str(tmp_path / "runs"), "--train", "48", "--val", "8", "--test", "8", "--max_epochs", "1"]
    variants = "shipped,shipped_no_block,no_attention"
    ds.main([*args, "--variants", variants, "--json", str(out), "--results_md", str(doc)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"shipped", "shipped_no_block", "no_attention"}
    assert not (tmp_path / "runs" / "shipped_no_block").exists()  # decoded from the shipped run, not trained
    for row in rows.values():
        assert 0 <= row["bleu4"] <= 1 and 0 <= row["digit_accuracy"] <= 1 and len(row["examples"]) == 5
    assert "localisation" in rows["shipped"] and "localisation" not in rows["no_attention"]
    text = doc.read_text()
    assert "old" not in text and "| no_attention |" in text and "48 training, 8 validation and 8 test" in text
    assert "| n/a | n/a | n/a |" in text  # no attention: nothing to localise
