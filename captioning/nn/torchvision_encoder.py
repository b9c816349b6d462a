"""Torchvision ResNet-family backbones as captioning encoders (:class:`ImageEncoder`).

The backbone is cut before its pooling and classifier, then ``AdaptiveAvgPool2d(grid_size)``
gives the Show-Attend-Tell grid (14x14). ImageNet weights come from the torch hub cache,
downloaded there on first use when online (``CAPTIONING_OFFLINE=1`` never downloads; the error
then names the file and the folder). ``trainable_from`` fine-tunes the last stages.
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

from captioning.data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from captioning.nn.encoders import (
    DOWNLOAD_TIMEOUT_S,
    OFFLINE_ENV_VARS,
    Encoder,
    WeightsNotFoundError,
    grid_features,
    offline,
)

__all__ = ["BACKBONES", "STAGES", "ImageEncoder", "resolve_weights"]

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
            raise ValueError(f"unknown trainable_from={trainable_from!r}; valid: None (frozen), 'all', {list(STAGES)}")
        resolved = resolve_weights(backbone, weights)  # validate the name even if weights_path wins
        # Constructor args as plain data: stored in checkpoints to rebuild this encoder.
        self.config = dict(
            backbone=backbone,
            weights=weights,
            weights_path=weights_path,
            grid_size=grid_size,
            trainable_from=trainable_from,
            channels_last=channels_last,
            image_size=image_size,
        )
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

        first = (
            len(STAGES) if trainable_from is None else 0 if trainable_from == "all" else STAGES.index(trainable_from)
        )
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
        return grid_features(self.pool(self.backbone(x)))

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone_name}, weights={self.weights_name}, grid_size={self.grid_size}, "
            f"out_channels={self.out_channels}, trainable_from={self.trainable_from}"
        )
