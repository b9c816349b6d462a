"""Image encoders: images (B, 3, H, W) -> a grid of feature vectors (B, S, C), S = grid_size**2.

Every encoder is an :class:`Encoder`: one interface that the captioner, the datamodules, the
feature cache and ``captioning caption`` rely on:

* ``forward(images)``: uint8 images (B, 3, H, W) (or floats in [0, 1]) -> (B, S, C). The base
  class normalises with the encoder's own mean/std, then calls ``encode``;
* ``preprocessing`` (:class:`captioning.data.images.Preprocessing`): the input size and mean/std
  it wants; datamodules and ``caption`` resize images to that size, never to an option of
  their own that could disagree;
* ``grid_size`` (the grid is grid_size x grid_size), ``out_channels`` (C), ``frozen``;
* ``config``: its constructor arguments as plain data, stored in checkpoints to rebuild it.

Implementations:

* :class:`ImageEncoder`: a torchvision ResNet-family backbone cut before its pooling and
  classifier, then ``AdaptiveAvgPool2d(grid_size)`` (the Show-Attend-Tell 14x14 grid);
  ImageNet weights come from the torch hub cache, downloaded there on first use when online.
* :class:`captioning.nn.timm_encoder.TimmEncoder`: any timm model with a spatial feature map
  (ConvNeXt, EfficientNet, RegNet, ViT patch grid), weights through timm's own cache
  (optional extra ``.[timm]``).
* :class:`PrecomputedFeatures`: stands for an extractor that ran elsewhere (grid and
  channels only, no weights): train from a feature cache with a config alone, then attach the
  real extractor (``captioning attach-encoder``) to caption photos.
* :class:`SmallCNN`: a few conv blocks trained from scratch; cheap enough on CPU for the
  built-in 64-px shapes dataset.

Your own encoder: subclass :class:`Encoder`, set the attributes above in ``__init__`` and
implement ``encode``. A checkpoint that names a class outside this package loads only when
the user trusts its module explicitly (``--trust_module``; see captioning.io.checkpoints).

Grid positions are flattened row-major (y, then x), so ``alpha.view(T, grid, grid)`` is the
attention map over the image as drawn (x right, y down).
"""

from __future__ import annotations

import os
import socket
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from captioning.data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, as_unit_float

__all__ = ["BACKBONES", "STAGES", "Encoder", "ImageEncoder", "PrecomputedFeatures", "SmallCNN",
           "WeightsNotFoundError", "encoder_config"]

# Backbones that share torchvision's ResNet layout (conv1/bn1/relu/maxpool/layer1..4/avgpool/fc).
BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
# Stages in input order; ``trainable_from`` names the first one that is fine-tuned.
STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")
_STAGE_MODULES = {"conv1": ("conv1", "bn1", "relu", "maxpool")} | {s: (s,) for s in STAGES[1:]}

# Any of these set to a true value means: never try to download weights.
OFFLINE_ENV_VARS = ("CAPTIONING_OFFLINE", "TORCH_HUB_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
DOWNLOAD_TIMEOUT_S = 10.0


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are neither cached nor downloadable; the message names the file."""


def offline() -> bool:
    """True when one of :data:`OFFLINE_ENV_VARS` is set to a true value: never download weights."""
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"} for v in OFFLINE_ENV_VARS)


def _check_images(images: Tensor, in_channels: int, who: str) -> None:
    if images.dim() != 4 or images.size(1) != in_channels:
        raise ValueError(f"{who} expects images of shape (B, {in_channels}, H, W), got {tuple(images.shape)}")


class Encoder(nn.Module):
    """Base of every image encoder: normalisation, preprocessing and the checkpoint contract.

    Subclasses call :meth:`set_preprocessing` and set ``out_channels``, ``grid_size`` and
    ``config`` (their init args as plain JSON-able data) in ``__init__``, and implement
    :meth:`encode`.

    Shapes: forward(images (B, 3, H, W) uint8, or float in [0, 1]) -> (B, grid_size**2, C).
    """

    out_channels: int
    grid_size: int
    config: dict
    sees_images = True  # False for stand-ins of extractors that ran elsewhere (PrecomputedFeatures)

    def set_preprocessing(self, preprocessing: Preprocessing) -> None:
        """What inputs this encoder wants; mean/std become (non-persistent) buffers."""
        self.preprocessing = preprocessing
        self.register_buffer("_mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 or [0, 1] float images (B, 3, H, W) -> (x - mean) / std in float32."""
        _check_images(images, 3, type(self).__name__)
        return (as_unit_float(images) - self._mean) / self._std

    def encode(self, x: Tensor) -> Tensor:
        """Normalised images (B, 3, H, W) -> features (B, grid_size**2, out_channels)."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        return self.encode(self.normalize(images))

    @property
    def frozen(self) -> bool:
        """True when no parameter is trained (its features can be cached)."""
        return not any(p.requires_grad for p in self.parameters())

    @classmethod
    def restore_args(cls, init_args: dict) -> dict:
        """Init args to rebuild this encoder around weights loaded from a checkpoint: nothing
        is downloaded again (subclasses with pretrained weights switch them off here)."""
        return dict(init_args)


def _grid_features(x: Tensor) -> Tensor:
    """(B, C, g, g) -> (B, g*g, C), positions row-major. A view when x is channels_last."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def resolve_weights(backbone: str, weights: str | None) -> torchvision.models.WeightsEnum | None:
    """Turn "DEFAULT" / "IMAGENET1K_V2" / "ResNet101_Weights.IMAGENET1K_V2" into the enum entry.

    None, "" and "none" mean random initialisation. Raises ValueError listing the valid names.
    """
    if weights is None or weights.strip().lower() in {"", "none", "null"}:
        return None
    enum_cls = torchvision.models.get_model_weights(backbone)
    valid = list(enum_cls.__members__)  # includes the DEFAULT alias
    name = weights.strip()
    if "." in name:
        prefix, name = name.split(".", 1)
        if prefix != enum_cls.__name__:
            raise ValueError(
                f"weights={weights!r} do not belong to backbone {backbone!r}: expected "
                f"{enum_cls.__name__}.<name> with <name> one of {valid}"
            )
    if name not in enum_cls.__members__:
        raise ValueError(f"unknown weights {weights!r} for {backbone!r}; valid: {valid} (or None for random init)")
    return enum_cls[name]


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Load a .pth state dict (weights_only) with errors that name the file."""
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt/truncated downloads land here
        raise ValueError(f"{path}: not a readable PyTorch state dict ({err.__class__.__name__}: {err})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def _hub_checkpoint(weights: torchvision.models.WeightsEnum) -> Path:
    """Path of the cached file for ``weights``: <torch.hub.get_dir()>/checkpoints/<url file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _fetch_pretrained(weights: torchvision.models.WeightsEnum) -> Path:
    """The cached checkpoint file for ``weights``, downloading it only when allowed and quick.

    torch.hub's own download has no timeout and would hang without a network, so we set a
    short socket timeout around it and turn every failure into one message that says which
    file to put where.
    """
    cached = _hub_checkpoint(weights)
    if cached.is_file():
        return cached
    help_text = (
        f"pretrained weights {weights!r} not found: expected the file {cached.name} in "
        f"{cached.parent} (torch.hub.get_dir()/checkpoints; TORCH_HOME moves it). Download "
        f"{weights.url} where there is a network and copy it there, or pass "
        f"weights_path=/path/to/{cached.name}, or weights=None for random initialisation."
    )
    if offline():
        set_vars = [v for v in OFFLINE_ENV_VARS if os.environ.get(v)]
        raise WeightsNotFoundError(f"{help_text} (no download tried: offline mode via {', '.join(set_vars)})")
    cached.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(cached.name)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(weights.url, str(cached), match.group(1) if match else None, progress=True)
    except Exception as err:  # URLError, timeouts, hash mismatch: all mean "put the file there"
        raise WeightsNotFoundError(f"{help_text} (download failed: {err.__class__.__name__}: {err})") from err
    finally:
        socket.setdefaulttimeout(old_timeout)
    return cached


class ImageEncoder(Encoder):
    """Pretrained torchvision CNN backbone -> (B, grid_size**2, out_channels) features.

    Args:
        backbone: one of :data:`BACKBONES` (torchvision builder name).
        weights: torchvision weight name ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2" or
            "ResNet101_Weights.IMAGENET1K_V2"); None = random init. Read from
            ``torch.hub.get_dir()/checkpoints/<file>`` (``~/.cache/torch/hub`` by default);
            when the file is missing it is downloaded there on first use, unless offline
            (``CAPTIONING_OFFLINE=1``, ``TORCH_HUB_OFFLINE=1``, ...): then, or when the
            download fails, :class:`WeightsNotFoundError` says which file to put where.
        weights_path: a local .pth state dict of the torchvision model (``fc.*`` keys are
            ignored, a ``module.`` prefix is stripped); takes precedence over ``weights``.
        grid_size: side of the output grid (adaptive average pooling, any input size).
        trainable_from: None freezes the whole backbone; a stage name from :data:`STAGES`
            fine-tunes that stage and all later ones; "all" fine-tunes everything. Frozen
            stages also keep BatchNorm in eval mode when ``.train()`` is called.
        channels_last: run the backbone in channels_last memory format (faster on GPUs
            with tensor cores, especially under mixed precision).
        image_size: input side in pixels (images are resized to image_size x image_size);
            ImageNet mean/std normalisation.

    Shapes: forward(images (B, 3, H, W) uint8 or [0, 1]) -> (B, grid_size**2, C).
    """

    def __init__(
        self,
        backbone: str = "resnet101",
        weights: str | None = "DEFAULT",
        weights_path: str | None = None,
        grid_size: int = 14,
        trainable_from: str | None = None,
        channels_last: bool = False,
        image_size: int = 224,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; valid: {list(BACKBONES)}")
        if grid_size < 1:
            raise ValueError(f"grid_size must be >= 1, got {grid_size}")
        if trainable_from is not None and trainable_from != "all" and trainable_from not in STAGES:
            raise ValueError(
                f"unknown trainable_from={trainable_from!r}; valid: None (frozen), 'all', {list(STAGES)}"
            )
        resolved = resolve_weights(backbone, weights)  # validate the name even if weights_path wins
        # Constructor args as plain data: stored in checkpoints to rebuild this encoder.
        self.config = dict(backbone=backbone, weights=weights, weights_path=weights_path, grid_size=grid_size,
                           trainable_from=trainable_from, channels_last=channels_last, image_size=image_size)
        self.set_preprocessing(Preprocessing(image_size, IMAGENET_MEAN, IMAGENET_STD))
        self.backbone_name = backbone
        self.weights_name = str(resolved) if resolved is not None else None
        self.grid_size = grid_size
        self.trainable_from = trainable_from
        self.channels_last = channels_last

        net = torchvision.models.get_model(backbone, weights=None)
        self.out_channels: int = net.fc.in_features
        # Same child names as torchvision, so torchvision state dicts (minus fc.*) load as is.
        self.backbone = nn.Sequential(OrderedDict((n, getattr(net, n)) for s in STAGES for n in _STAGE_MODULES[s]))
        self.pool = nn.AdaptiveAvgPool2d(grid_size)

        if weights_path is not None:
            self._load(Path(weights_path).expanduser())
        elif resolved is not None:
            self._load(_fetch_pretrained(resolved))

        first = len(STAGES) if trainable_from is None else 0 if trainable_from == "all" else STAGES.index(trainable_from)
        self._frozen_stages = STAGES[:first]
        for stage in self._frozen_stages:
            for name in _STAGE_MODULES[stage]:
                getattr(self.backbone, name).requires_grad_(False)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.train(self.training)  # puts the frozen stages in eval mode right away

    def _load(self, path: Path) -> None:
        state = _read_state_dict(path)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            self.backbone.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path}: weights do not fit backbone {self.backbone_name!r}: {err}") from err

    @classmethod
    def restore_args(cls, init_args: dict) -> dict:
        return {**init_args, "weights": None, "weights_path": None}

    def train(self, mode: bool = True) -> ImageEncoder:
        """Like nn.Module.train, but frozen stages stay in eval mode (BatchNorm stats fixed)."""
        super().train(mode)
        if len(self._frozen_stages) == len(STAGES):
            self.backbone.train(False)
        for stage in self._frozen_stages:
            for name in _STAGE_MODULES[stage]:
                getattr(self.backbone, name).train(False)
        return self

    def encode(self, x: Tensor) -> Tensor:
        """Normalised images (B, 3, H, W) -> features (B, grid_size**2, out_channels)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return _grid_features(self.pool(self.backbone(x)))

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone_name}, weights={self.weights_name}, grid_size={self.grid_size}, "
            f"out_channels={self.out_channels}, trainable_from={self.trainable_from}"
        )


def _conv_block(cin: int, cout: int, stride: int, kernel: int = 3) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),  # BN has the bias
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(Encoder):
    """A small from-scratch CNN for 64-px synthetic images -> (B, grid_size**2, channels).

    Three stride-2 3x3 blocks (64 -> 32 -> 16 -> 8 px; widths w, 2w, 4w), one stride-1 3x3
    block at 8x8 (receptive field 31 px, enough for a ~20 px shape), and a 1x1 projection to
    ``channels``. Channels stay narrow before the last downsampling because the early
    full-resolution convs dominate the CPU cost (batch 64 fwd+bwd: ~20 ms on 2 cores).

    Attention mixes grid cells into one context vector, which would lose *where* a shape
    is; a learned position embedding per grid cell keeps "left"/"top" recoverable.

    Args:
        channels: output feature size C.
        grid_size: output grid side (adaptive average pooling of the 1/8-resolution map).
        width: base width w of the conv blocks.
        position_embedding: add a learned (grid_size**2, C) embedding to the features.
        image_size: input side in pixels (the built-in dataset draws 64-px scenes).
    """

    def __init__(
        self,
        channels: int = 128,
        grid_size: int = 8,
        width: int = 16,
        position_embedding: bool = True,
        image_size: int = 64,
    ) -> None:
        super().__init__()
        if min(channels, grid_size, width, image_size) < 1:
            raise ValueError(
                f"SmallCNN sizes must be >= 1, got channels={channels}, grid_size={grid_size}, "
                f"width={width}, image_size={image_size}"
            )
        # Constructor args as plain data: stored in checkpoints to rebuild this encoder.
        self.config = dict(channels=channels, grid_size=grid_size, width=width,
                           position_embedding=position_embedding, image_size=image_size)
        self.set_preprocessing(Preprocessing(image_size, IMAGENET_MEAN, IMAGENET_STD))
        self.out_channels = channels
        self.grid_size = grid_size
        w = width
        self.features = nn.Sequential(
            *_conv_block(3, w, 2),
            *_conv_block(w, 2 * w, 2),
            *_conv_block(2 * w, 4 * w, 2),
            *_conv_block(4 * w, 4 * w, 1),
            *_conv_block(4 * w, channels, 1, kernel=1),
        )
        self.pool = nn.AdaptiveAvgPool2d(grid_size)
        if position_embedding:
            self.position = nn.Parameter(torch.empty(1, grid_size * grid_size, channels))
            nn.init.normal_(self.position, std=0.1)
        else:
            self.register_parameter("position", None)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def encode(self, x: Tensor) -> Tensor:
        """Normalised images (B, 3, H, W) -> features (B, grid_size**2, channels)."""
        feats = _grid_features(self.pool(self.features(x)))
        return feats if self.position is None else feats + self.position


class PrecomputedFeatures(Encoder):
    """Stands for an image feature extractor that ran elsewhere: its grid and channels, no weights.

    Train the decoder from a feature cache made by any extractor (``features.npy`` (N, H, W, C)
    + ``index.json``, see captioning/data/feature_cache.py) with a config alone. The model cannot see
    images until the real extractor is attached (``captioning attach-encoder``): calling it on
    images raises an error that says so.

    Args:
        grid_size: side of the feature grid (H = W).
        channels: feature size C.
        extractor: free text saying what made the features (shown in errors and model cards).
        image_size, mean, std: the extractor's preprocessing, recorded for the model card and
            checked when the real extractor is attached.
    """

    def __init__(self, grid_size: int, channels: int, extractor: str = "an external feature extractor",
                 image_size: int = 224, mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD) -> None:
        super().__init__()
        if grid_size < 1 or channels < 1:
            raise ValueError(f"PrecomputedFeatures: grid_size and channels must be >= 1, got {grid_size}, {channels}")
        preprocessing = Preprocessing(image_size, tuple(mean), tuple(std))
        self.config = dict(grid_size=grid_size, channels=channels, extractor=extractor, image_size=image_size,
                           mean=list(preprocessing.mean), std=list(preprocessing.std))
        self.set_preprocessing(preprocessing)
        self.grid_size, self.out_channels, self.extractor = grid_size, channels, extractor

    sees_images = False

    @property
    def frozen(self) -> bool:
        return True

    def encode(self, x: Tensor) -> Tensor:
        raise RuntimeError(
            f"this model was trained on precomputed {self.grid_size}x{self.grid_size}x{self.out_channels} features "
            f"from {self.extractor}; it has no image encoder. Attach the extractor that made them: "
            "captioning attach-encoder --ckpt_path CKPT --encoder ENCODER.yaml --output NEW.ckpt")

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}, channels={self.out_channels}, extractor={self.extractor!r}"


def encoder_config(encoder: nn.Module) -> dict:
    """An encoder's constructor config as plain data, ``{"class_path", "init_args"}``: what
    checkpoints, feature caches and exported models store to rebuild it (its ``config``)."""
    init_args = getattr(encoder, "config", None)
    if not isinstance(init_args, dict):
        raise TypeError(f"{type(encoder).__name__} does not record its init args: set self.config = dict(...) "
                        "(plain JSON-able values) in __init__, as captioning.nn.encoders.Encoder subclasses do")
    cls = type(encoder)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(init_args)}

