"""Image loading and normalisation shared by datamodules, the caption command and overlays."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageReadError(ValueError):
    """An image file could not be read; the message names the file."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with an error that names the file when it is not an image."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a directory, not an image")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: not a readable image ({err.__class__.__name__}: {err})") from err


def to_tensor(image: Image.Image, size: int) -> Tensor:
    """PIL RGB -> (3, size, size) float tensor, resized (bilinear) and ImageNet-normalised."""
    image = image.resize((size, size), Image.BILINEAR)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    x = x.permute(2, 0, 1).float().div_(255.0)
    return normalize(x)


def normalize(x: Tensor) -> Tensor:
    """(…, 3, H, W) in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def denormalize(x: Tensor) -> Tensor:
    """Inverse of :func:`normalize`, clamped to [0, 1]. (…, 3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)
