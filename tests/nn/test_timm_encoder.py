"""TimmEncoder: any timm backbone as a grid encoder; pretrained weights only through timm's hub
cache (never the network in tests); tiny models with random weights."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from captioning.nn.encoders import WeightsNotFoundError  # noqa: E402
from captioning.nn.timm_encoder import TimmEncoder  # noqa: E402

CNN, VIT = "mobilenetv3_small_050", "vit_tiny_patch16_224"


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache, and any download attempt fails the test."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def forbidden(*args, **kwargs):
        raise AssertionError(f"tried to download {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", forbidden)
    return tmp_path / "hub"


@pytest.mark.parametrize(("name", "grid", "channels"), [(CNN, 7, 288), (VIT, 14, 192)])
def test_native_grid_channels_and_preprocessing(name, grid, channels):
    enc = TimmEncoder(name, pretrained=False)
    assert (enc.grid_size, enc.out_channels) == (grid, channels)
    assert enc.preprocessing.image_size == 224
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        out = enc(images)
    assert out.shape == (2, grid * grid, channels) and torch.isfinite(out).all()


def test_vit_patch_tokens_are_laid_out_row_major_without_the_class_token():
    enc = TimmEncoder(VIT, pretrained=False).eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        tokens = enc.model.forward_features(enc.normalize(x))  # (1, 1 + 196, 192)
        out = enc(x)
    assert torch.equal(out[0, 0], tokens[0, 1])  # top-left patch, class token dropped
    assert torch.equal(out[0, 14], tokens[0, 1 + 14])  # first patch of the second row


def test_grid_size_pools_any_model_to_the_requested_grid():
    enc = TimmEncoder(CNN, pretrained=False, grid_size=3)
    with torch.no_grad():
        assert enc(torch.rand(1, 3, 96, 96)).shape == (1, 9, 288)


def test_frozen_by_default_and_trainable_on_request():
    frozen = TimmEncoder(CNN, pretrained=False)
    assert frozen.frozen and not frozen.train().model.training  # BatchNorm statistics stay fixed
    trainable = TimmEncoder(CNN, pretrained=False, trainable=True)
    assert not trainable.frozen and trainable.train().model.training


def test_offline_without_cached_weights_names_the_cache_and_never_downloads(no_hub, monkeypatch):
    monkeypatch.setenv("CAPTIONING_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="not in the Hugging Face cache") as err:
        TimmEncoder(CNN, pretrained=True)
    assert str(no_hub) in str(err.value) and "pretrained=False" in str(err.value)


def test_pretrained_weights_come_from_the_hub_cache_layout(no_hub, monkeypatch):
    """The cache laid out as huggingface_hub lays it out: models--org--name/snapshots/<commit>/file."""
    from safetensors.torch import save_file

    monkeypatch.setenv("CAPTIONING_OFFLINE", "1")
    torch.manual_seed(5)
    reference = timm.create_model(CNN, pretrained=False)
    repo = timm.models.get_pretrained_cfg(CNN).hf_hub_id
    commit = "a" * 40
    snapshot = no_hub / ("models--" + repo.replace("/", "--")) / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(snapshot / "model.safetensors"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    enc = TimmEncoder(CNN, pretrained=True)
    assert torch.equal(enc.model.conv_stem.weight, reference.conv_stem.weight)


def test_checkpoint_round_trip_rebuilds_without_pretrained_weights(tmp_path, no_hub, monkeypatch):
    from captioning.data.vocab import Vocabulary
    from captioning.io.model_loading import load_model
    from captioning.models.image_captioner import ImageCaptioner

    model = ImageCaptioner(
        TimmEncoder(CNN, pretrained=False, grid_size=2),
        Vocabulary(["a"]).to_dict(),
        embed_dim=8,
        decoder_dim=8,
        attention_dim=8,
    ).eval()
    model.encoder.config["pretrained"] = True  # as a real run records it
    model.hparams["encoder"]["init_args"]["pretrained"] = True
    path = tmp_path / "timm.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": {
                "_class_path": "captioning.models.image_captioner.ImageCaptioner",
                **dict(model.hparams),
            },
        },
        path,
    )
    monkeypatch.setenv("CAPTIONING_OFFLINE", "1")  # the weights are in the checkpoint: nothing to fetch
    loaded = load_model(path)
    x = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(loaded.encoder(x), model.encoder(x))
