"""Cached-feature datamodule: batches follow the interface, epochs cover the data, stale caches
are rebuilt, features from elsewhere are accepted, and a model trains from it."""

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from captioning.data.cached import CachedFeaturesDataModule
from captioning.data.feature_cache import write_feature_cache
from captioning.data.sampling import LengthBucketBatchSampler, OneCaptionPerImageSampler
from captioning.data.shapes import ShapesDataModule
from captioning.data.vocab import Vocabulary
from captioning.models.image_captioner import ImageCaptioner
from captioning.nn.encoders import SmallCNN
from captioning.nn.torchvision_encoder import ImageEncoder


def _encoder():
    torch.manual_seed(0)
    return SmallCNN(channels=8, grid_size=2, width=4).requires_grad_(False)


def _shapes(**kw):
    return ShapesDataModule(**{"batch_size": 8, "train_size": 24, "val_size": 6, "test_size": 5, **kw})


@pytest.fixture
def cached(tmp_path):
    dm = CachedFeaturesDataModule(_shapes(), str(tmp_path / "cache"), captions_per_epoch="one")
    dm.build_cache(_encoder())
    dm.setup()
    return dm


def test_batches_carry_features_instead_of_images(cached):
    batch = next(iter(cached.train_dataloader()))
    assert "images" not in batch and batch["features"].shape == (8, 4, 8)
    assert batch["features"].dtype == torch.float16
    assert batch["captions"][:, 0].eq(Vocabulary.bos_id).all()
    assert torch.equal(batch["lengths"], (batch["captions"] != 0).sum(1))
    assert len(batch["references"][0]) == 5 and "boxes" not in batch  # training needs no boxes
    val = next(iter(cached.val_dataloader()))
    assert len(val["boxes"]) == len(val["image_ids"])  # named boxes for the localisation metric
    assert val["image_ids"] == list(range(6))  # one item per image, in order
    torch.testing.assert_close(
        val["features"].float(),
        _encoder().eval()(next(iter(_shapes().val_dataloader()))["images"]),
        atol=2e-3,
        rtol=2e-3,
    )
    assert next(iter(cached.predict_dataloader()))["captions"].shape == (5, 0)


def test_one_caption_per_image_each_epoch_and_epochs_differ(cached):
    loader = cached.train_dataloader()
    seen = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)  # what Lightning calls every epoch
        seen.append([(i, tuple(c.tolist())) for b in loader for i, c in zip(b["image_ids"], b["captions"])])
    assert sorted(i for i, _ in seen[0]) == list(range(24))  # every image exactly once
    assert seen[0] != seen[1]


def test_all_pairs_mode_visits_every_caption(tmp_path):
    dm = CachedFeaturesDataModule(_shapes(), str(tmp_path), captions_per_epoch="all", bucket_by_length=False)
    dm.build_cache(_encoder())
    items = sum(len(b["image_ids"]) for b in dm.train_dataloader())
    assert items == 24 * 5


def test_length_buckets_cover_everything_once_with_less_padding():
    lengths = torch.randint(3, 30, (400,)).tolist()
    sampler = LengthBucketBatchSampler(range(400), 16, lengths=lengths, pool=10)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(400))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    random = sum(max(lengths[i] for i in range(s, min(s + 16, 400))) * 16 for s in range(0, 400, 16))
    assert padded < 0.8 * random
    one = list(OneCaptionPerImageSampler([[0, 1], [2], [3, 4, 5]]))
    assert len(one) == 3 and {0, 1} & set(one) and 2 in one and {3, 4, 5} & set(one)


def test_one_caption_per_image_shards_across_ranks_buckets_and_reshuffles():
    import torch.utils.data as tud

    groups = [[2 * i, 2 * i + 1] for i in range(101)]  # 101 images, 2 captions each
    lengths = torch.randint(3, 30, (202,)).tolist()
    ranks = [
        OneCaptionPerImageSampler(groups, seed=1, lengths=lengths, batch_size=8, pool=4, num_replicas=2, rank=r)
        for r in (0, 1)
    ]
    assert all(isinstance(s, tud.DistributedSampler) for s in ranks)  # Lightning keeps it under DDP
    shards = [list(s) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == 51  # ceil(101 / 2), padded
    images = [i // 2 for i in shards[0] + shards[1]]
    assert set(images) == set(range(101)) and len(images) == 102  # every image, one padding repeat
    for shard in shards:  # consecutive runs of batch_size are length buckets: less padding than random
        batches = [shard[i : i + 8] for i in range(0, len(shard), 8)]
        assert all(len(b) == 8 for b in batches[:-1])  # only the last batch is short
        padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        assert padded <= sum(max(lengths[i] for i in sorted(shard, key=str)[k : k + 8]) * 8 for k in range(0, 51, 8))
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != shards[0]


def test_stale_cache_is_rebuilt_when_encoder_or_data_change(tmp_path):
    dm = CachedFeaturesDataModule(_shapes(), str(tmp_path))
    dm.build_cache(_encoder())
    assert dm._stale("train", _encoder()) is None
    other = SmallCNN(channels=8, grid_size=2, width=4).requires_grad_(False)  # different random weights
    assert "different encoder" in dm._stale("train", other)
    noisier = CachedFeaturesDataModule(_shapes(noise=0.1), str(tmp_path))
    assert "different data settings" in noisier._stale("train", _encoder())
    assert CachedFeaturesDataModule(_shapes(batch_size=4), str(tmp_path))._stale("train", _encoder()) is None


class _FilesData:
    """A COCO-like datamodule: references(split) decide membership; features come from elsewhere."""

    vocab = Vocabulary(["a", "dog", "cat"])
    batch_size, image_size = 2, 64

    def references(self, split):
        return {"train": {11: ["a dog", "a cat"], 12: ["a cat"]}, "val": {13: ["a dog"]}, "test": {13: ["a dog"]}}[
            split
        ]


def test_features_from_another_extractor_in_one_shared_folder(tmp_path):
    write_feature_cache(tmp_path, [11, 12, 13], np.ones((3, 2, 2, 6), dtype=np.float32))
    dm = CachedFeaturesDataModule(_FilesData(), str(tmp_path), build=False, bucket_by_length=False)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert sorted(i for b in batches for i in b["image_ids"]) == [11, 11, 12]  # every (image, caption) pair
    assert batches[0]["features"].shape[1:] == (4, 6)
    assert next(iter(dm.val_dataloader()))["references"] == [["a dog"]]


def test_trainable_encoder_or_wrong_grid_is_refused(cached):
    vocab = cached.vocab.to_dict()
    with pytest.raises(ValueError, match="trainable"):
        _check(ImageCaptioner(SmallCNN(channels=8, grid_size=2), vocab), cached)
    with pytest.raises(ValueError, match="2x2x8 features but the model's encoder makes 3x3x8"):
        _check(ImageCaptioner(SmallCNN(channels=8, grid_size=3).requires_grad_(False), vocab), cached)


def _check(model, dm):
    from captioning.data.cached import _check_model

    _check_model(model, dm._caches["train"])


def test_lightning_trains_from_the_cache_it_builds(tmp_path):
    shapes = _shapes(image_size=64)
    dm = CachedFeaturesDataModule(shapes, str(tmp_path / "cache"), captions_per_epoch="one")
    torch.manual_seed(0)
    model = ImageCaptioner(
        ImageEncoder("resnet18", weights=None, grid_size=2),
        shapes.vocab.to_dict(),
        embed_dim=8,
        decoder_dim=16,
        attention_dim=8,
        beam_size=2,
        max_length=5,
    )
    before = {n: p.clone() for n, p in model.decoder.named_parameters()}
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm)
    assert (tmp_path / "cache" / "train" / "features.npy").is_file()  # built at prepare_data
    assert any(not torch.equal(p, before[n]) for n, p in model.decoder.named_parameters())
    index = json.loads((tmp_path / "cache" / "train" / "index.json").read_text())
    assert index["encoder"]["init_args"]["image_size"] == model.encoder.preprocessing.image_size == 224


def test_coco_images_on_disk_are_cached_and_coco_can_bucket(tmp_path):
    from PIL import Image

    from captioning.data.coco import CocoCaptionsDataModule

    images = []
    for i, split in enumerate(["train", "train", "val", "test"]):
        Image.new("RGB", (20, 14), (60 * i, 0, 0)).save(tmp_path / f"{i}.jpg")
        words = ["a red thing"] + ["a much longer red thing on a table"] * (i % 2)
        images.append(
            {
                "filename": f"{i}.jpg",
                "split": split,
                "cocoid": 100 + i,
                "sentences": [{"raw": w, "tokens": w.split()} for w in words],
            }
        )
    (tmp_path / "k.json").write_text(__import__("json").dumps({"images": images}))
    coco = CocoCaptionsDataModule(
        karpathy_json=str(tmp_path / "k.json"),
        image_root=str(tmp_path),
        min_count=1,
        batch_size=2,
        bucket_by_length=True,
    )
    assert sorted(len(b["image_ids"]) for b in coco.train_dataloader()) == [1, 2]  # 3 pairs, all visited
    dm = CachedFeaturesDataModule(coco, str(tmp_path / "cache"))
    caches = dm.build_cache(_encoder())
    assert caches["train"].image_ids == [100, 101] and caches["test"].image_ids == [103]
    batch = next(iter(dm.val_dataloader()))
    assert batch["image_ids"] == [102] and batch["references"] == [["a red thing"]]
