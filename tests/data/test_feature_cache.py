"""Feature cache: format round trip, building encodes each image once, clear errors."""

import json

import numpy as np
import pytest
import torch

from captioning.data.feature_cache import FeatureCache, build_feature_cache, encoder_fingerprint, write_feature_cache
from captioning.nn.encoders import SmallCNN
from captioning.nn.torchvision_encoder import ImageEncoder


def test_user_features_round_trip_row_major_float16(tmp_path):
    grid = np.random.default_rng(0).normal(size=(3, 2, 2, 5)).astype(np.float32)  # N, H, W, C
    cache = write_feature_cache(tmp_path / "c", ["a", "b", 7], grid)
    assert cache.image_ids == ["a", "b", 7] and cache.grid == (2, 2) and cache.channels == 5
    assert np.load(tmp_path / "c" / "features.npy").dtype == np.float16
    feats = cache.read(cache.rows_of([7, "a", 7]))  # (n, S, C), repeated image read once
    assert feats.shape == (3, 4, 5) and feats.dtype == torch.float16
    expected = torch.from_numpy(grid[[2, 0, 2]].reshape(3, 4, 5))  # positions row-major (y, x)
    torch.testing.assert_close(feats.float(), expected, atol=1e-2, rtol=1e-3)
    assert feats[0, 1, 0] == torch.tensor(grid[2, 0, 1, 0]).half()  # (y=0, x=1) is position 1


def test_minimal_index_from_another_extractor_is_accepted(tmp_path):
    np.save(tmp_path / "features.npy", np.zeros((2, 3, 3, 4), dtype=np.float32))
    (tmp_path / "index.json").write_text(json.dumps({"image_ids": [10, 11]}))
    cache = FeatureCache(tmp_path)
    assert cache.rows_of([11, 10]) == [1, 0] and cache.read([1]).shape == (1, 9, 4)


def test_bad_caches_name_the_file_or_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        FeatureCache(tmp_path)
    np.save(tmp_path / "features.npy", np.zeros((2, 3, 3, 4), dtype=np.float16))
    (tmp_path / "index.json").write_text(json.dumps({"image_ids": [1, 2, 3]}))
    with pytest.raises(ValueError, match="2 rows but .* lists 3"):
        FeatureCache(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"image_ids": [1, 1]}))
    with pytest.raises(ValueError, match="not unique"):
        FeatureCache(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"image_ids": [1, 2]}))
    with pytest.raises(KeyError, match="99"):
        FeatureCache(tmp_path).rows_of([99])
    np.save(tmp_path / "features.npy", np.zeros((2, 9, 4), dtype=np.float16))
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        FeatureCache(tmp_path)


def _frozen_cnn():
    torch.manual_seed(0)
    enc = SmallCNN(channels=8, grid_size=2, width=4)
    return enc.requires_grad_(False).eval()


def test_build_encodes_every_image_once_and_keeps_captions(tmp_path):
    enc = _frozen_cnn()
    images = torch.randn(5, 3, 64, 64)
    calls = []
    enc.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    batches = [
        {"images": images[:3], "image_ids": [0, 1, 2], "references": [["a"], ["b"], ["c"]]},
        {"images": images[3:], "image_ids": [3, 4], "references": [["d"], ["e"]]},
    ]
    cache = build_feature_cache(enc, batches, 5, tmp_path / "train", image_size=64)
    assert sum(calls) == 5  # each image encoded exactly once
    with torch.no_grad():
        expected = enc(images)
    torch.testing.assert_close(cache.read(range(5)).float(), expected, atol=2e-3, rtol=2e-3)
    assert cache.captions["references"]["4"] == ["e"]
    assert cache.index["encoder_sha1"] == encoder_fingerprint(enc) and cache.index["image_size"] == 64
    assert cache.index["encoder"]["class_path"] == "captioning.nn.encoders.SmallCNN"


def test_build_refuses_trainable_encoder_and_wrong_counts(tmp_path):
    batch = [{"images": torch.randn(2, 3, 64, 64), "image_ids": [0, 1]}]
    with pytest.raises(ValueError, match="trainable parameters"):
        build_feature_cache(SmallCNN(channels=8, grid_size=2), batch, 2, tmp_path / "x")
    with pytest.raises(ValueError, match="yielded 2 images, expected 3"):
        build_feature_cache(_frozen_cnn(), batch, 3, tmp_path / "y")
    assert not (tmp_path / "y").exists()  # no half-written cache left behind


def test_fingerprint_changes_with_the_weights():
    a = ImageEncoder("resnet18", weights=None, grid_size=2)
    fp = encoder_fingerprint(a)
    assert fp == encoder_fingerprint(a)
    with torch.no_grad():
        a.backbone.conv1.weight[0, 0, 0, 0] += 1.0
    assert encoder_fingerprint(a) != fp


def test_writing_a_cache_never_replaces_a_folder_that_is_not_a_cache(tmp_path):
    import numpy as np

    from captioning.data.feature_cache import write_feature_cache

    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not a feature cache folder"):
        write_feature_cache(precious, [0], np.zeros((1, 1, 1, 1)))
    assert (precious / "chapter1.tex").read_text() == "years of work"
    assert [p.name for p in tmp_path.iterdir()] == ["thesis"]  # no temporary folder left behind
    write_feature_cache(tmp_path / "cache", [0], np.zeros((1, 1, 1, 2)))
    assert write_feature_cache(tmp_path / "cache", [0, 1], np.ones((2, 1, 1, 2))).image_ids == [
        0,
        1,
    ]  # a cache: replaced


@pytest.mark.parametrize(
    "value, what",
    [(float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"), (70000.0, "values beyond float16's range")],
)
def test_non_finite_or_float16_overflowing_features_are_refused_when_written_naming_the_id(tmp_path, value, what):
    features = np.random.default_rng(0).normal(size=(3, 2, 2, 4)).astype(np.float32)
    features[1, 0, 1, 2] = value
    with pytest.raises(ValueError, match=rf"image id 'img-b' hold {what}"):
        write_feature_cache(tmp_path / "c", ["img-a", "img-b", "img-c"], features)
    assert not (tmp_path / "c").exists()


def test_an_encoder_giving_nan_for_one_image_stops_the_build_naming_it(tmp_path):
    enc = _frozen_cnn()
    images = torch.randn(4, 3, 64, 64)
    images[2] = float("nan")
    batches = [{"images": images[:2], "image_ids": [10, 11]}, {"images": images[2:], "image_ids": [12, 13]}]
    with pytest.raises(ValueError, match="image id 12 hold NaN"):
        build_feature_cache(enc, batches, 4, tmp_path / "train")
    assert not (tmp_path / "train").exists()


def test_a_cache_written_by_hand_with_nan_is_refused_when_read_naming_the_id(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    features = np.ones((3, 2, 2, 4), dtype=np.float16)
    features[2, 1, 1, 0] = np.nan
    np.save(folder / "features.npy", features)
    (folder / "index.json").write_text(json.dumps({"image_ids": ["a", "b", "c"]}))
    cache = FeatureCache(folder)
    assert cache.read([0, 1]).shape == (2, 4, 4)
    with pytest.raises(ValueError, match=r"image id 'c' \(row 2\) are NaN or infinite"):
        cache.read([1, 2])


def test_a_malformed_captions_file_is_named(tmp_path):
    cache = write_feature_cache(tmp_path / "c", [0], np.zeros((1, 2, 2, 4)))
    (cache.path / "captions.json").write_text("{'references': oops")
    with pytest.raises(ValueError, match=r"c/captions.json: not valid JSON"):
        FeatureCache(cache.path)


def test_cache_folders_get_the_usual_permissions(tmp_path):
    import os

    old = os.umask(0o022)
    os.umask(old)
    cache = write_feature_cache(tmp_path / "c", [0], np.zeros((1, 2, 2, 4)))
    assert (cache.path.stat().st_mode & 0o777) == 0o777 & ~old
    assert ((cache.path / "features.npy").stat().st_mode & 0o777) == 0o666 & ~old
