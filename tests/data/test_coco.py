"""CocoCaptionsDataModule on tiny COCO-format data written by the tests (official + Karpathy)."""

import json

import pytest
import torch
from PIL import Image

from captioning.data.coco import CocoCaptionsDataModule
from captioning.data.images import ImageReadError, Preprocessing
from captioning.data.vocab import Vocabulary

SIZE = 24
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _image(path, color, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 14), color).save(path, fmt)


# ----------------------------------------------------------------------------- official COCO
TRAIN_CAPS = {
    1: ["A dog runs on the grass.", "The dog plays."],
    2: ["A dog sleeps.", "A cat and a dog!"],
    3: ["A cat sits on a rare mat."],  # "rare", "mat", "sits" occur once
}
VAL_CAPS = {10: ["A zebra eats.", "Two zebras graze.", "Zebra in a field."], 11: ["A dog."]}


def _write_coco_split(root, split, caps):
    images, anns = [], []
    for k, (img_id, texts) in enumerate(caps.items()):
        name = f"{img_id:012d}.jpg"
        _image(root / split / name, COLORS[k % len(COLORS)], "JPEG")
        images.append({"id": img_id, "file_name": name, "width": 20, "height": 14})
        anns += [{"id": img_id * 100 + j, "image_id": img_id, "caption": t} for j, t in enumerate(texts)]
    ann_file = root / "annotations" / f"captions_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
    return ann_file


@pytest.fixture
def coco(tmp_path):
    return {
        "train_annotations": str(_write_coco_split(tmp_path, "train2017", TRAIN_CAPS)),
        "val_annotations": str(_write_coco_split(tmp_path, "val2017", VAL_CAPS)),
        "train_images": str(tmp_path / "train2017"),
        "val_images": str(tmp_path / "val2017"),
    }


def _dm(**kw):
    kw.setdefault("batch_size", 4)
    dm = CocoCaptionsDataModule(**kw)
    dm.use_preprocessing(Preprocessing(SIZE))  # what a model's encoder states
    return dm


def test_coco_format_splits_and_vocab_min_count(coco):
    dm = _dm(**coco, min_count=2)
    assert [i for i, _ in dm.image_records("train")] == [1, 2, 3]
    assert [i for i, _ in dm.image_records("val")] == [10, 11]
    assert dm.image_records("train")[0][1].endswith("train2017/000000000001.jpg")
    # No test_annotations: val doubles as test.
    assert dm.references("test") == dm.references("val")
    assert dm.references("val")[10] == ["a zebra eats", "two zebras graze", "zebra in a field"]
    vocab = dm.vocab  # before setup(): LightningCLI links it at instantiation
    assert "dog" in vocab and "cat" in vocab and "a" in vocab
    assert "rare" not in vocab and "mat" not in vocab  # seen once < min_count
    assert "zebra" not in vocab  # val captions never enter the vocabulary
    assert dm.vocab is vocab


def test_train_batches_follow_interface(coco):
    dm = _dm(**coco, min_count=1, max_caption_length=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader.dataset) == sum(len(c) for c in TRAIN_CAPS.values())  # one item per caption
    batches = list(loader)
    b = batches[0]
    assert set(b) == {"images", "captions", "lengths", "image_ids", "references"}
    assert b["images"].dtype == torch.uint8 and b["images"].shape == (4, 3, SIZE, SIZE)
    assert b["captions"].dtype == torch.long and b["lengths"].dtype == torch.long
    assert b["captions"].shape[1] == int(b["lengths"].max())
    for cap, n in zip(b["captions"], b["lengths"]):
        assert cap[0] == Vocabulary.bos_id and cap[n - 1] == Vocabulary.eos_id
        assert (cap[n:] == Vocabulary.pad_id).all() and (cap[1 : n - 1] > Vocabulary.eos_id).all()
        assert n <= 3 + 2  # truncated to max_caption_length words + bos/eos
    seen = [(i, refs) for batch in batches for i, refs in zip(batch["image_ids"], batch["references"])]
    assert sorted(i for i, _ in seen) == [1, 1, 2, 2, 3]
    assert dict(seen)[2] == ["a dog sleeps", "a cat and a dog"]


def test_val_one_item_per_image_with_all_references(coco):
    dm = _dm(**coco, min_count=1)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert len(batches) == 1
    b = batches[0]
    assert b["image_ids"] == [10, 11]
    assert b["references"][0] == ["a zebra eats", "two zebras graze", "zebra in a field"]
    # "captions" is the first reference; zebra is unknown to the train vocabulary.
    assert dm.vocab.decode(b["captions"][0].tolist()) == ["a", "<unk>", "<unk>"]
    assert b["lengths"].tolist() == [5, 4] and b["captions"][1, 4] == Vocabulary.pad_id


def test_images_are_decoded_and_resized_to_the_encoder_input_size(tmp_path):
    j = _write_karpathy(tmp_path)
    dm = _dm(karpathy_json=str(j), image_root=str(tmp_path / "imgs"), min_count=1)
    batch = next(iter(dm.val_dataloader()))
    img = batch["images"][0]  # val image "v.png" is pure red (lossless PNG), 20x14 on disk
    assert img.shape == (3, SIZE, SIZE) and img.dtype == torch.uint8
    assert torch.equal(img, torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1).expand_as(img))


# ----------------------------------------------------------------------------- Karpathy json
def _write_karpathy(tmp_path, coco_style=True):
    def entry(i, name, split, sents, color):
        folder = ("train2014" if split != "val" else "val2014") if coco_style else ""
        _image(tmp_path / "imgs" / folder / name, color, "PNG")
        e = {
            "filename": name,
            "imgid": i,
            "split": split,
            "sentences": [{"tokens": s.split(), "raw": s + "."} for s in sents],
        }
        if coco_style:
            e.update(filepath=folder, cocoid=1000 + i)
        return e

    images = [
        entry(0, "a.png", "train", ["A Dog runs", "a dog"], (0, 255, 0)),
        entry(1, "b.png", "restval", ["a cat", "a Dog sits"], (0, 0, 255)),
        entry(2, "v.png", "val", ["a red square", "red"], (255, 0, 0)),
        entry(3, "t.png", "test", ["a blue thing"], (0, 0, 255)),
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco" if coco_style else "flickr8k"}))
    return path


def test_karpathy_splits_restval_and_paths(tmp_path):
    j = _write_karpathy(tmp_path)
    dm = _dm(karpathy_json=str(j), image_root=str(tmp_path / "imgs"), min_count=2)
    assert [i for i, _ in dm.image_records("train")] == [1000, 1001]  # restval -> train
    assert [i for i, _ in dm.image_records("val")] == [1002]
    assert dm.image_records("test") == [(1003, str(tmp_path / "imgs" / "train2014" / "t.png"))]
    assert dm.references("train")[1000] == ["a dog runs", "a dog"]  # provided tokens, lowercased
    assert set(dm.vocab.itos[4:]) == {"a", "dog"}  # count >= 2 in train (incl. restval)

    dropped = _dm(karpathy_json=str(j), image_root=str(tmp_path / "imgs"), restval_to_train=False)
    assert [i for i, _ in dropped.image_records("train")] == [1000]
    with pytest.raises(ValueError, match="restval"):
        dm.image_records("restval")


def test_karpathy_flickr_layout_and_predict(tmp_path):
    j = _write_karpathy(tmp_path, coco_style=False)  # flickr: root/filename, id = imgid
    dm = _dm(karpathy_json=str(j), image_root=str(tmp_path / "imgs"), min_count=1)
    assert dm.image_records("val") == [(2, str(tmp_path / "imgs" / "v.png"))]
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert [i for b in batches for i in b["image_ids"]] == [3]  # the test split
    assert batches[0]["captions"].shape == (1, 0) and batches[0]["lengths"].tolist() == [0]
    assert batches[0]["images"].shape == (1, 3, SIZE, SIZE)


# ----------------------------------------------------------------------------- vocab file
def test_vocab_saved_as_json_and_existing_file_reused(tmp_path, coco):
    path = tmp_path / "out" / "vocab.json"
    built = _dm(**coco, min_count=1, vocab_path=str(path)).vocab
    assert Vocabulary.from_dict(json.loads(path.read_text())) == built

    custom = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", "dog", "zebra"])
    custom.save(path)
    before = path.read_text()
    dm = _dm(**coco, min_count=1, vocab_path=str(path))
    assert dm.vocab == custom  # loaded, not rebuilt from the train captions
    assert path.read_text() == before
    dm.setup("fit")
    b = next(iter(dm.val_dataloader()))
    assert dm.vocab.decode(b["captions"][0].tolist()) == ["<unk>", "zebra", "<unk>"]


# ----------------------------------------------------------------------------- errors
def test_argument_errors(tmp_path, coco):
    with pytest.raises(ValueError, match="karpathy_json"):
        CocoCaptionsDataModule()
    with pytest.raises(ValueError, match="not both"):
        CocoCaptionsDataModule(karpathy_json="x.json", image_root="imgs", **coco)
    with pytest.raises(ValueError, match="image_root"):
        CocoCaptionsDataModule(karpathy_json="x.json")


def test_missing_annotation_file_names_path(tmp_path, coco):
    missing = tmp_path / "annotations" / "captions_nope.json"
    dm = _dm(**{**coco, "val_annotations": str(missing)})
    with pytest.raises(FileNotFoundError, match="captions_nope.json") as err:
        dm.vocab
    assert str(missing) in str(err.value) and "COCO captions annotation file" in str(err.value)
    dm = _dm(karpathy_json=str(tmp_path / "dataset_coco.json"), image_root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Karpathy split json"):
        dm.setup("fit")


def test_missing_image_dir_names_path(tmp_path, coco):
    dm = _dm(**{**coco, "train_images": str(tmp_path / "no_such_dir")})
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        dm.setup("fit")
    j = _write_karpathy(tmp_path)
    dm = _dm(karpathy_json=str(j), image_root=str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        dm.vocab


def test_detection_annotations_rejected(tmp_path, coco):
    inst = tmp_path / "instances_train2017.json"
    inst.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "x.jpg"}],
                "annotations": [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}],
                "categories": [{"id": 3, "name": "cat"}],
            }
        )
    )
    with pytest.raises(ValueError, match="instances_train2017.json.*caption"):
        _dm(**{**coco, "train_annotations": str(inst)}).vocab


def test_missing_and_corrupt_images_name_the_file(tmp_path, coco):
    (tmp_path / "train2017" / "000000000002.jpg").unlink()
    with pytest.raises(ImageReadError, match="000000000002.jpg"):
        _dm(**coco, min_count=1).setup("fit")

    (tmp_path / "train2017" / "000000000002.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageReadError, match="000000000002.jpg"):  # header check at setup
        _dm(**coco, min_count=1).setup("fit")
    dm = _dm(**coco, min_count=1, check_images="exists")
    dm.setup("fit")
    with pytest.raises(ImageReadError, match="000000000002.jpg"):  # without it: when read
        list(dm.train_dataloader())


def test_dataloader_settings(coco):
    dm = _dm(**coco, min_count=1, num_workers=1)
    loader = dm.train_dataloader()  # sets itself up when Lightning has not
    assert loader.persistent_workers and loader.num_workers == 1
    assert loader.pin_memory == torch.cuda.is_available()
    assert not _dm(**coco, min_count=1).val_dataloader().persistent_workers
