"""The pointing game over named boxes (captioning.eval.localisation) and where boxes come from
(captioning.data.boxes: COCO instances files, boxes JSON; the built-in dataset's objects)."""

from __future__ import annotations

import json

import pytest
import torch

from captioning.eval.localisation import pointing_game

# A 4x4 grid; boxes as fractions. Two circles (red top-left, blue bottom-right), a green square.
SCENE = [
    {"box": [0.0, 0.0, 0.5, 0.5], "nouns": ["circle"], "attributes": ["small", "red"]},
    {"box": [0.5, 0.5, 1.0, 1.0], "nouns": ["circle"], "attributes": ["small", "blue"]},
    {"box": [0.5, 0.0, 1.0, 0.5], "nouns": ["square"], "attributes": ["large", "green"]},
]


def _peaks(cells: list[tuple[int, int]], grid: int = 4) -> torch.Tensor:
    """(T, grid, grid) attention with a single peak at each (row, col)."""
    alpha = torch.full((len(cells), grid, grid), 0.01)
    for t, (r, c) in enumerate(cells):
        alpha[t, r, c] = 0.9
    return alpha


def test_hits_and_misses_of_nouns():
    words = ["a", "square", "and", "a", "circle"]
    out = pointing_game([words], [_peaks([(3, 3), (0, 3), (3, 3), (3, 3), (3, 0)])], [SCENE])
    # square: peak top-right, hit; circle: bottom-left is in neither circle, miss
    assert (out["localisation_hits"], out["localisation_total"]) == (1, 2)
    assert out["localisation"] == pytest.approx(0.5) and out["localisation_nouns"] == pytest.approx(0.5)


def test_attributes_narrow_the_referred_thing_and_are_scored_with_their_noun():
    words = ["a", "blue", "circle"]
    on_red, on_blue = _peaks([(0, 0)] * 3), _peaks([(0, 0), (3, 3), (3, 3)])
    assert pointing_game([words], [on_red], [SCENE])["localisation_hits"] == 0  # the blue one was named
    out = pointing_game([words], [on_blue], [SCENE])
    assert (out["localisation_hits"], out["localisation_total"]) == (2, 2)  # "blue" and "circle"
    assert (out["localisation_nouns_hits"], out["localisation_nouns_total"]) == (1, 1)
    plain = pointing_game([["a", "circle"]], [_peaks([(0, 0), (0, 0)])], [SCENE])
    assert plain["localisation_hits"] == 1  # without a colour either circle counts
    chain = pointing_game([["blue", "square", "circle"]], [_peaks([(0, 0)] * 3)], [SCENE])
    assert chain["localisation_nouns_total"] == 2 and chain["localisation_nouns_hits"] == 1  # blue is not the circle's


def test_things_not_boxed_in_the_image_are_not_scored():
    out = pointing_game([["a", "triangle", "and", "a", "dog"]], [_peaks([(0, 0)] * 5)], [SCENE])
    assert out["localisation_total"] == 0 and out["localisation"] == 0.0


def test_chance_is_the_share_of_cells_a_random_peak_would_hit():
    out = pointing_game([["a", "square"]], [_peaks([(0, 0), (0, 3)])], [SCENE])
    # the square is the top-right quarter; widened by half a cell (the hit rule) it holds the
    # centres of 3 x 3 of the 16 cells
    assert out["localisation_nouns_chance"] == pytest.approx(9 / 16)
    everywhere = [{"box": [0, 0, 1, 1], "nouns": ["scene"]}]
    assert pointing_game([["scene"]], [_peaks([(1, 1)])], [everywhere])["localisation_chance"] == 1.0


def test_half_cell_tolerance_and_flat_alpha():
    tiny = [{"box": [0.26, 0.26, 0.3, 0.3], "nouns": ["circle"]}]
    near = _peaks([(1, 1)]).flatten(1)  # (T, S) form; centre 0.375 is within half a cell
    assert pointing_game([["circle"]], [near], [tiny])["localisation"] == 1.0
    assert pointing_game([["circle"]], [_peaks([(0, 0)])], [tiny])["localisation"] == 0.0


def test_bad_input_names_the_image_and_box():
    with pytest.raises(ValueError, match="image 0"):
        pointing_game([["a", "circle"]], [_peaks([(0, 0)])], [SCENE])
    with pytest.raises(ValueError, match="box 0"):
        pointing_game([["circle"]], [_peaks([(0, 0)])], [[{"box": [0.5, 0, 0.2, 1], "nouns": ["circle"]}]])


# ----------------------------------------------------------------------------- box sources
def test_coco_instances_give_named_boxes_with_synonyms(tmp_path):
    from captioning.data.boxes import read_instances

    path = tmp_path / "instances_val2014.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 7, "width": 200, "height": 100, "file_name": "a.jpg"}],
                "categories": [
                    {"id": 1, "name": "person"},
                    {"id": 18, "name": "dog"},
                    {"id": 67, "name": "dining table"},
                ],
                "annotations": [
                    {"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 100, 50]},
                    {"id": 2, "image_id": 7, "category_id": 18, "bbox": [150, 50, 50, 50]},
                    {"id": 3, "image_id": 7, "category_id": 67, "bbox": [0, 50, 200, 50]},
                ],
            }
        )
    )
    boxes = read_instances(path)[7]
    assert boxes[0]["box"] == [0.0, 0.0, 0.5, 0.5] and {"man", "woman", "people", "person"} <= set(boxes[0]["nouns"])
    assert {"dog", "dogs", "puppy"} <= set(boxes[1]["nouns"]) and "table" in boxes[2]["nouns"]
    out = pointing_game([["a", "man", "and", "his", "puppy"]], [_peaks([(0, 0)] * 4 + [(3, 3)])], [boxes])
    assert (out["localisation_hits"], out["localisation_total"]) == (2, 2)


def test_boxes_json_and_its_errors_name_the_file(tmp_path):
    from captioning.data.boxes import read_boxes_json

    good = tmp_path / "boxes.json"
    good.write_text(
        json.dumps(
            {
                "12": [{"word": "Dog", "box": [0.1, 0.1, 0.5, 0.9]}],
                "dogs/001.jpg": [{"words": ["cat", "kitten"], "box": [0, 0, 1, 1]}],
            }
        )
    )
    boxes = read_boxes_json(good)
    assert boxes[12] == boxes["12"] == [{"box": [0.1, 0.1, 0.5, 0.9], "nouns": ["dog"]}]
    assert boxes["dogs/001.jpg"][0]["nouns"] == ["cat", "kitten"]
    bad = tmp_path / "pixels.json"
    bad.write_text(json.dumps({"1": [{"word": "dog", "box": [10, 10, 50, 90]}]}))
    with pytest.raises(ValueError, match="pixels.json.*fractions"):
        read_boxes_json(bad)


def test_shapes_batches_carry_named_boxes():
    from captioning.data.shapes import ShapesDataModule

    dm = ShapesDataModule(batch_size=4, train_size=4, val_size=4, test_size=4)
    batch = next(iter(dm.val_dataloader()))
    for objects, boxes in zip(batch["objects"], batch["boxes"]):
        assert [b["nouns"] for b in boxes] == [[o["shape"]] for o in objects]
        assert [b["attributes"] for b in boxes] == [[o["size"], o["color"]] for o in objects]
        assert [b["box"] for b in boxes] == [o["box"] for o in objects]


def test_localisation_is_measured_on_coco_format_data_with_an_instances_file(tmp_path):
    """COCO-format photos + an instances file of their objects: validation logs the pointing game."""
    import lightning.pytorch as pl

    from captioning.data.coco import CocoCaptionsDataModule
    from captioning.models.image_captioner import ImageCaptioner
    from captioning.nn.encoders import SmallCNN

    from support.photos import karpathy, write_photos

    items = write_photos(tmp_path)
    instances = tmp_path / "instances.json"
    sizes = [(96, 64), (64, 96), (80, 80), (120, 90)]
    things = {"ball": 1, "box": 2}
    instances.write_text(
        json.dumps(
            {
                "images": [
                    {"id": p.cocoid, "width": sizes[p.index % 4][0], "height": sizes[p.index % 4][1]} for p in items
                ],
                "categories": [{"id": 1, "name": "ball"}, {"id": 2, "name": "box"}],
                "annotations": [
                    {
                        "id": p.index,
                        "image_id": p.cocoid,
                        "category_id": things[p.captions[1].split()[1]],
                        "bbox": [
                            0.3 * sizes[p.index % 4][0],
                            0.3 * sizes[p.index % 4][1],
                            0.4 * sizes[p.index % 4][0],
                            0.4 * sizes[p.index % 4][1],
                        ],
                    }
                    for p in items
                ],
            }
        )
    )
    dm = CocoCaptionsDataModule(
        karpathy_json=str(karpathy(tmp_path, items)),
        image_root=str(tmp_path),
        min_count=1,
        batch_size=4,
        instances_file=str(instances),
    )
    model = ImageCaptioner(
        SmallCNN(channels=8, grid_size=4, width=4, image_size=32),
        dm.vocab.to_dict(),
        embed_dim=8,
        decoder_dim=16,
        attention_dim=8,
        beam_size=1,
        max_length=6,
    )
    # A decoder biased to say "box", so generated words name a boxed thing.
    with torch.no_grad():
        model.decoder.output.bias[dm.vocab.stoi["box"]] = 20.0  # the val photos show boxes
    trainer = pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.validate(model, datamodule=dm)
    metrics = trainer.callback_metrics
    assert "val/localisation" in metrics and "val/localisation_nouns_chance" in metrics
    assert 0.0 < float(metrics["val/localisation_nouns_chance"]) < 1.0  # the boxes cover part of the grid
    batch = next(iter(dm.val_dataloader()))
    assert batch["boxes"][0][0]["box"] == pytest.approx([0.3, 0.3, 0.7, 0.7])


def test_boxes_json_attributes_make_the_describing_words_scored(tmp_path):
    from captioning.data.boxes import read_boxes_json

    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"5": [{"word": "dog", "attributes": ["Brown", "small"], "box": [0.0, 0.0, 0.5, 0.5]}]}))
    boxes = read_boxes_json(path)[5]
    assert boxes == [{"box": [0.0, 0.0, 0.5, 0.5], "nouns": ["dog"], "attributes": ["brown", "small"]}]
    # "a small brown dog": all three words look at the dog (top-left) -> 3 scored words, 3 hits;
    # without attributes only "dog" would count.
    out = pointing_game([["a", "small", "brown", "dog"]], [_peaks([(3, 3), (0, 0), (0, 0), (1, 1)])], [boxes])
    assert (out["localisation_hits"], out["localisation_total"]) == (3, 3)
    assert (out["localisation_nouns_hits"], out["localisation_nouns_total"]) == (1, 1)
    plain = [{k: v for k, v in boxes[0].items() if k != "attributes"}]
    out = pointing_game([["a", "small", "brown", "dog"]], [_peaks([(3, 3), (0, 0), (0, 0), (1, 1)])], [plain])
    assert out["localisation_total"] == 1
    path.write_text(json.dumps({"5": [{"word": "dog", "attributes": "brown", "box": [0, 0, 1, 1]}]}))
    with pytest.raises(ValueError, match=r"boxes.json \['5'\]\[0\]: 'attributes' must be a list"):
        read_boxes_json(path)
