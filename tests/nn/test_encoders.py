"""Encoders: feature-grid shapes, freezing, offline weight loading, SmallCNN training signal."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from captioning.nn import encoders
from captioning.nn.encoders import SmallCNN, WeightsNotFoundError
from captioning.nn.torchvision_encoder import ImageEncoder

RESNET18_FILE = "resnet18-f37072fd.pth"  # file name in torchvision's ResNet18_Weights.IMAGENET1K_V1 url


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Empty torch hub cache, and any download attempt fails the test loudly."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    calls = []

    def forbidden(url, dst, *args, **kwargs):
        calls.append(url)
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    return calls


def _bn_stats(module: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone() for m in module.modules() if isinstance(m, nn.BatchNorm2d) for t in (m.running_mean, m.running_var)
    ]


@pytest.mark.parametrize(
    ("backbone", "size", "grid", "channels"),
    [("resnet50", 64, 2, 2048), ("resnet18", 224, 14, 512)],
)
def test_output_shape_and_channels(backbone, size, grid, channels):
    enc = ImageEncoder(backbone, weights=None, grid_size=grid)
    assert enc.out_channels == channels and enc.grid_size == grid
    with torch.no_grad():
        out = enc(torch.randn(2, 3, size, size))
    assert out.shape == (2, grid * grid, channels)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("hw", [(48, 48), (80, 80), (100, 70), (33, 129)])
def test_adaptive_pool_gives_requested_grid_from_any_size(hw):
    enc = ImageEncoder("resnet18", weights=None, grid_size=3).eval()
    with torch.no_grad():
        assert enc(torch.randn(1, 3, *hw)).shape == (1, 9, 512)


def test_grid_is_row_major_over_the_feature_map():
    """Position s = y * grid + x, so alpha.view(grid, grid) lines up with the image."""
    enc = ImageEncoder("resnet18", weights=None, grid_size=2).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fmap = enc.pool(enc.backbone(enc.normalize(images)))  # (1, C, 2, 2)
        out = enc(images)
    assert torch.equal(out[0, 1], fmap[0, :, 0, 1])  # top-right
    assert torch.equal(out[0, 2], fmap[0, :, 1, 0])  # bottom-left


def test_frozen_encoder_has_no_trainable_params_and_stays_in_eval():
    enc = ImageEncoder("resnet18", weights=None, grid_size=2)  # trainable_from=None
    assert enc.frozen
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()  # what Lightning does at the start of every training epoch
    assert enc.training
    assert not any(m.training for m in enc.backbone.modules())
    before = _bn_stats(enc)
    out = enc(torch.randn(4, 3, 64, 64))
    assert not out.requires_grad
    for a, b in zip(before, _bn_stats(enc)):
        assert torch.equal(a, b)


def test_trainable_from_layer4_trains_only_layer4():
    enc = ImageEncoder("resnet18", weights=None, grid_size=2, trainable_from="layer4").train()
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    layer4 = {f"backbone.layer4.{n}" for n, _ in enc.backbone.layer4.named_parameters()}
    assert trainable == layer4 and layer4
    assert not enc.frozen
    assert enc.backbone.layer4.training and not enc.backbone.layer3.training and not enc.backbone.bn1.training
    # Gradients reach layer4 and nothing earlier.
    enc(torch.randn(2, 3, 64, 64)).sum().backward()
    assert enc.backbone.layer4[0].conv1.weight.grad is not None
    assert enc.backbone.layer3[0].conv1.weight.grad is None


def test_trainable_from_all_and_layer3():
    enc = ImageEncoder("resnet18", weights=None, grid_size=2, trainable_from="all")
    assert all(p.requires_grad for p in enc.parameters())
    enc = ImageEncoder("resnet18", weights=None, grid_size=2, trainable_from="layer3")
    stages = {n.split(".")[1] for n, p in enc.named_parameters() if p.requires_grad}
    assert stages == {"layer3", "layer4"}


def test_bad_trainable_from_lists_valid_names():
    with pytest.raises(ValueError, match="layer4") as err:
        ImageEncoder("resnet18", weights=None, trainable_from="layer5")
    assert "layer5" in str(err.value)


def test_bad_backbone_name_lists_valid_ones():
    with pytest.raises(ValueError, match="resnet101") as err:
        ImageEncoder("resnet99", weights=None)
    assert "resnet99" in str(err.value)


def test_weights_from_local_file(tmp_path, no_network):
    ref = torchvision.models.resnet18(weights=None)  # a full torchvision state dict, fc included
    path = tmp_path / "my_resnet18.pth"
    torch.save(ref.state_dict(), path)
    # weights="DEFAULT" is ignored when weights_path is given: no cache lookup, no download.
    enc = ImageEncoder("resnet18", weights_path=str(path), grid_size=2)
    assert no_network == []
    loaded = enc.backbone.state_dict()
    for name, tensor in ref.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(loaded[name], tensor), name


def test_local_file_for_wrong_backbone_names_the_file(tmp_path, no_network):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="r18.pth"):
        ImageEncoder("resnet34", weights=None, weights_path=str(path))
    with pytest.raises(WeightsNotFoundError, match="missing.pth"):
        ImageEncoder("resnet18", weights=None, weights_path=str(tmp_path / "missing.pth"))


def test_missing_weights_offline_names_file_and_never_downloads(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("CAPTIONING_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as err:
        ImageEncoder("resnet18", weights="IMAGENET1K_V1", grid_size=2)
    message = str(err.value)
    assert RESNET18_FILE in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "weights_path" in message
    assert no_network == []


def test_failed_download_gives_the_same_clear_error(tmp_path, monkeypatch):
    for var in encoders.OFFLINE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    tried = []

    def unreachable(url, dst, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(WeightsNotFoundError, match=RESNET18_FILE) as err:
        ImageEncoder("resnet18", weights="DEFAULT", grid_size=2)
    assert tried == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert "download failed" in str(err.value)


def test_weights_load_from_hub_cache_without_download(tmp_path, no_network):
    ref = torchvision.models.resnet18(weights=None)
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(ref.state_dict(), cache / RESNET18_FILE)
    for name in ("DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"):
        enc = ImageEncoder("resnet18", weights=name, grid_size=2)
        assert torch.equal(enc.backbone.conv1.weight, ref.conv1.weight)
    assert no_network == []


@pytest.mark.parametrize("weights", ["IMAGENET1K_V9", "ResNet50_Weights.IMAGENET1K_V2"])
def test_bad_weights_name(weights, no_network):
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        ImageEncoder("resnet18", weights=weights)


def test_channels_last_gives_the_same_features():
    torch.manual_seed(0)
    plain = ImageEncoder("resnet18", weights=None, grid_size=2).eval()
    fast = ImageEncoder("resnet18", weights=None, grid_size=2, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    assert fast.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(images), plain(images), rtol=1e-4, atol=1e-4)


def test_wrong_image_shape_is_a_clear_error():
    enc = ImageEncoder("resnet18", weights=None, grid_size=2)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc(torch.randn(3, 64, 64))


@pytest.mark.parametrize(("size", "grid"), [(64, 8), (64, 4), (96, 8)])
def test_small_cnn_shapes(size, grid):
    enc = SmallCNN(channels=32, grid_size=grid)
    assert enc.out_channels == 32 and enc.grid_size == grid and not enc.frozen
    assert enc(torch.randn(3, 3, size, size)).shape == (3, grid * grid, 32)


def test_small_cnn_gradients_reach_every_parameter():
    enc = SmallCNN().train()
    out = enc(torch.randn(4, 3, 64, 64))
    assert out.shape == (4, 64, 128)
    (out**2).mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_small_cnn_position_embedding_tells_cells_apart():
    """Attention mixes cells into one vector; only the embedding says where a feature came from."""
    torch.manual_seed(0)
    uniform = torch.full((1, 3, 64, 64), 0.5)
    with_pos, without = SmallCNN().eval(), SmallCNN(position_embedding=False).eval()
    with torch.no_grad():
        a, b = with_pos(uniform).view(8, 8, -1), without(uniform).view(8, 8, -1)
    torch.testing.assert_close(b[3, 3], b[4, 4])  # interior cells of a plain image look alike
    assert not torch.allclose(a[3, 3], a[4, 4], atol=1e-3)


def test_small_cnn_position_embedding_is_optional():
    assert SmallCNN(position_embedding=False).position is None
    assert SmallCNN(grid_size=4, channels=16).position.shape == (1, 16, 16)


def test_config_is_plain_data_that_rebuilds_the_encoder():
    """Checkpoints store ``config`` (JSON-able) and rebuild the encoder from it."""
    import json

    for enc in (ImageEncoder("resnet18", weights=None, grid_size=3, trainable_from="layer4"), SmallCNN(grid_size=4)):
        config = json.loads(json.dumps(enc.config))
        again = type(enc)(**config)
        again.load_state_dict(enc.state_dict())
        assert (again.out_channels, again.grid_size) == (enc.out_channels, enc.grid_size)
        assert [p.requires_grad for p in again.parameters()] == [p.requires_grad for p in enc.parameters()]
