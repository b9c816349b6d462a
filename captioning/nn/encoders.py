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

* :class:`captioning.nn.torchvision_encoder.ImageEncoder`: a torchvision ResNet-family backbone
  cut before its pooling and classifier, then ``AdaptiveAvgPool2d(grid_size)`` (the
  Show-Attend-Tell 14x14 grid); ImageNet weights come from the torch hub cache, downloaded there
  on first use when online.
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
the user trusts its module explicitly (``--trust_module``; see captioning.io.model_loading).

Grid positions are flattened row-major (y, then x), so ``alpha.view(T, grid, grid)`` is the
attention map over the image as drawn (x right, y down).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from captioning.data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, as_unit_float

__all__ = [
    "Encoder",
    "PrecomputedFeatures",
    "SmallCNN",
    "WeightsNotFoundError",
    "encoder_config",
    "grid_features",
    "offline",
]

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
    _mean: Tensor  # (1, 3, 1, 1) buffers of set_preprocessing
    _std: Tensor
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
    def starts_pretrained(self) -> bool:
        """True when the weights come from pretraining (fine-tuned gently, at ``encoder_lr``);
        False when they start random (trained at the decoder's ``lr`` unless ``encoder_lr`` is set)."""
        return bool(self.config.get("weights") or self.config.get("weights_path") or self.config.get("pretrained"))

    @property
    def frozen(self) -> bool:
        """True when no parameter is trained (its features can be cached)."""
        return not any(p.requires_grad for p in self.parameters())

    @classmethod
    def restore_args(cls, init_args: dict) -> dict:
        """Init args to rebuild this encoder around weights loaded from a checkpoint: nothing
        is downloaded again (subclasses with pretrained weights switch them off here)."""
        return dict(init_args)


def grid_features(x: Tensor) -> Tensor:
    """(B, C, g, g) -> (B, g*g, C), positions row-major. A view when x is channels_last."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


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
        self.config = dict(
            channels=channels,
            grid_size=grid_size,
            width=width,
            position_embedding=position_embedding,
            image_size=image_size,
        )
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
        feats = grid_features(self.pool(self.features(x)))
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

    def __init__(
        self,
        grid_size: int,
        channels: int,
        extractor: str = "an external feature extractor",
        image_size: int = 224,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if grid_size < 1 or channels < 1:
            raise ValueError(f"PrecomputedFeatures: grid_size and channels must be >= 1, got {grid_size}, {channels}")
        preprocessing = Preprocessing(image_size, tuple(mean), tuple(std))
        self.config = dict(
            grid_size=grid_size,
            channels=channels,
            extractor=extractor,
            image_size=image_size,
            mean=list(preprocessing.mean),
            std=list(preprocessing.std),
        )
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
            "captioning attach-encoder --ckpt_path CKPT --encoder ENCODER.yaml --output NEW.ckpt"
        )

    def extra_repr(self) -> str:
        return f"grid_size={self.grid_size}, channels={self.out_channels}, extractor={self.extractor!r}"


def encoder_config(encoder: nn.Module) -> dict:
    """An encoder's constructor config as plain data, ``{"class_path", "init_args"}``: what
    checkpoints, feature caches and exported models store to rebuild it (its ``config``)."""
    init_args = getattr(encoder, "config", None)
    if not isinstance(init_args, dict):
        raise TypeError(
            f"{type(encoder).__name__} does not record its init args: set self.config = dict(...) "
            "(plain JSON-able values) in __init__, as captioning.nn.encoders.Encoder subclasses do"
        )
    cls = type(encoder)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(init_args)}
