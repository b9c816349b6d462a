"""Image files in, model inputs out: one loading path for datamodules, ``caption`` and overlays.
(Over 400 lines on purpose: every image file the package opens passes through this one module,
so there is one place to audit against hostile files.)

Batches carry images as ``uint8`` tensors (B, 3, H, W), already resized to the encoder's
input size: a quarter of the bytes of float images between DataLoader workers and the model.
The encoder itself turns them into its input (``[0, 1]`` floats, then ``(x - mean) / std``),
so there is exactly one normalisation, and it always matches the encoder (see
:class:`Preprocessing` and :class:`captioning.nn.encoders.Encoder`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import stat
import threading
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageReadError(ValueError):
    """An image file could not be read; the message names the file."""


@dataclass(frozen=True)
class Preprocessing:
    """How an encoder wants its images; stated by the encoder, read by datamodules and ``caption``.

    Attributes:
        image_size: images are resized to ``image_size x image_size`` (squashed, so the whole
            picture is seen and every attention cell maps back onto the image as drawn).
        mean, std: per-channel statistics the encoder normalises ``[0, 1]`` inputs with.
    """

    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN  # 3 numbers (any sequence; checked and stored as a tuple)
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size < 1:
            raise ValueError(f"preprocessing image_size must be a positive integer, got {self.image_size!r}")
        for name in ("mean", "std"):
            value = tuple(getattr(self, name))
            if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ValueError(f"preprocessing {name} must be 3 numbers (R, G, B), got {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if min(self.std) <= 0:
            raise ValueError(f"preprocessing std must be > 0, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (stored in checkpoints and exported model folders)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        if not isinstance(data, dict) or set(data) - {"image_size", "mean", "std"}:
            raise ValueError(f"preprocessing must be a dict with image_size, mean, std; got {data!r}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})  # type: ignore[arg-type]


#: Default pixel limit (width * height) of :func:`load_image` and the file checks: 100
#: megapixels, above any camera photo (a 50 MP phone or 61 MP full-frame photo passes) and far
#: below what a small "decompression bomb" file declares. Callers expose it (``--max_pixels``).
DEFAULT_MAX_PIXELS = 100_000_000
#: Images whose shorter side is below this many pixels get :func:`small_image_warning`.
MIN_SIDE = 32
#: Formats we open (Pillow names). Others Pillow knows (EPS runs Ghostscript, fonts, scientific
#: and legacy formats) are refused: captioning data are photos, and every extra parser is
#: attack surface for files users hand over.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "ICO", "JPEG2000", "AVIF")

# File signatures of IMAGE_FORMATS: a file that starts like one but that Pillow cannot open is
# reported as damaged rather than as "not an image".
_MAGIC = (
    (re.compile(rb"\xff\xd8\xff"), "JPEG"),
    (re.compile(rb"\x89PNG"), "PNG"),
    (re.compile(rb"GIF8"), "GIF"),
    (re.compile(rb"RIFF....WEBP", re.DOTALL), "WEBP"),
    (re.compile(rb"II\*\x00|MM\x00\*"), "TIFF"),
)
# The Pillow modes we turn into RGB, and those whose range is not 0..255 (see _wide_to_grey).
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_MODES = frozenset(
    ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr", "LAB", "HSV") + _WIDE_MODES
)
# EXIF orientation -> the transpose that makes the picture upright (as PIL.ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageTooLargeError(ImageReadError):
    """An image has more pixels than allowed; refused from its header, before decoding."""


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file as an upright 8-bit RGB picture, or fail with one clear message.

    * EXIF orientation is applied (a phone photo tagged "rotate 90" comes out upright); a
      damaged EXIF block is ignored and the pixels are used as stored.
    * Every Pillow mode becomes RGB: transparent pixels (``RGBA``, ``LA``, ``PA``, ``P`` or
      ``L``/``RGB`` with a transparent colour) are composited onto white; ``CMYK``,
      ``YCbCr``, ``LAB``, ``1`` and palettes are converted; 16-bit and 32-bit greyscale are
      scaled by their real range (0..65535 -> 0..255, so 32768 is mid grey, where Pillow's
      plain ``convert("RGB")`` clips everything above 255 to white; see ``_wide_to_grey``).
      16-bit RGB(A) PNGs are read by Pillow as 8-bit (the high byte), which is correct.
    * Animated GIF/PNG/WebP: the first frame.
    * ``max_pixels``: ``width * height`` above it raises :class:`ImageTooLargeError` from
      the header, before any pixel is decoded. ``None`` turns our limit off and leaves
      Pillow's own (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 MP): above it the image is
      refused rather than warned about. A ``max_pixels`` above twice Pillow's limit raises
      Pillow's limit for the process, since Pillow checks it by itself at open.

    Raises:
        ImageReadError: missing file, directory, empty or non-image file, a format outside
            :data:`IMAGE_FORMATS`, truncated or corrupt data. The message is one line that
            starts with the path; the original exception is kept as ``__cause__``. Pillow's
            warnings about damaged files never reach the caller.
    """
    image, _ = _read(path if isinstance(path, (str, Path)) else Path(path), max_pixels, decode=True)
    assert image is not None  # decode=True always gives an image or raises
    return image


def check_image_file(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Header-only check (no pixel decoding): ``(width, height)`` as stored in the file.

    The size is the stored one, before EXIF orientation (``load_image`` returns
    ``(height, width)`` for a photo tagged as rotated by 90 degrees). Raises like
    :func:`load_image` for everything visible in the header (missing/empty/non-image file,
    unsupported format or pixel mode, too many pixels); a file truncated after its header
    passes: :func:`verify_image_file` decodes it.
    """
    return _read(path, max_pixels, decode=False)[1]


def verify_image_file(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """Full check: decode the whole file exactly as :func:`load_image` does, keep nothing.

    Catches what the header check cannot (truncated or corrupt pixel data); when it passes,
    ``load_image`` on the same file succeeds. Raises :class:`ImageReadError` otherwise.
    """
    _read(path, max_pixels, decode=True)


def small_image_warning(image: Image.Image | tuple[int, int], name: str | Path, min_side: int = MIN_SIDE) -> str | None:
    """A one-line message when ``image`` (a PIL image or its ``(width, height)``) is too small.

    Images with a side below ``min_side`` pixels (default :data:`MIN_SIDE`) are blown up to
    the encoder's input size: a caption of a few blurred pixels means little. Returns None
    for images large enough; callers print or log the message.
    """
    width, height = image.size if isinstance(image, Image.Image) else image
    if min(width, height) >= min_side:
        return None
    return (
        f"{name}: image is only {width}x{height} pixels (a side below {min_side}); "
        f"it is upscaled to the model's input size and its caption may mean little"
    )


def _read(path: str | Path, max_pixels: int | None, decode: bool) -> tuple[Image.Image | None, tuple[int, int]]:
    """Open ``path`` (header), check it, decode to upright RGB when ``decode``; errors named."""
    if max_pixels is not None and (not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    _check_plain_file(path)
    if max_pixels is not None and Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # else Pillow refuses what the caller allowed
    with _pillow_warnings_dropped():
        try:
            with Image.open(path, formats=_formats()) as img:
                size = img.size
                _check_header(img, path, max_pixels)
                if not decode:
                    return None, size
                img.load()
                _check_header(img, path, max_pixels)  # a plugin may resize while decoding
                return _to_rgb(_upright(img)), size
        except ImageReadError:
            raise
        except UnidentifiedImageError as err:
            head = _head(path)
            known = next((name for magic, name in _MAGIC if magic.match(head)), None)
            raise ImageReadError(
                f"{path}: damaged {known} file (its header cannot be read)"
                if known
                else f"{path}: not an image in a supported format ({', '.join(IMAGE_FORMATS)}); "
                f"the file starts with {head[:16]!r}"
            ) from err
        except Image.DecompressionBombError as err:  # Pillow's check at open, above 2x its limit
            found = re.search(r"\((\d+) pixels\)", str(err))  # Pillow's message has no width x height
            pixels = int(found[1]) if found else None
            count = f"{pixels:,} pixels" if pixels else f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels"
            raise ImageTooLargeError(_too_large(path, count, pixels, max_pixels)) from err
        except Exception as err:  # noqa: BLE001 - hostile files make Pillow raise nearly anything
            raise ImageReadError(f"{path}: not a readable image ({_one_line(err)})") from err


def _check_plain_file(path: str | Path) -> None:
    """Missing files, folders, devices/FIFOs (which could block forever) and empty files."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except OSError as err:
        raise ImageReadError(f"{path}: cannot read the file ({_one_line(err)})") from err
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(f"{path}: is a directory, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(f"{path}: not a regular file (a device, pipe or socket)")
    if st.st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")


def _check_header(img: Image.Image, path: str | Path, max_pixels: int | None) -> None:
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageReadError(f"{path}: image has no pixels ({width}x{height})")
    pixels = width * height
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    if limit is not None and pixels > limit:
        raise ImageTooLargeError(_too_large(path, f"{width}x{height} = {pixels:,} pixels", pixels, max_pixels))
    if img.mode not in _MODES:
        raise ImageReadError(f"{path}: unsupported pixel mode {img.mode!r} ({img.format})")


def _too_large(path: str | Path, size: str, pixels: int | None, max_pixels: int | None) -> str:
    """The refusal message: file, size, limit, and the option that raises the limit."""
    option = f"--max_pixels {pixels}" if pixels else "--max_pixels"
    if max_pixels is None:
        return (
            f"{path}: image is {size}, above Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} pixels "
            f"(PIL.Image.MAX_IMAGE_PIXELS, which applies when max_pixels is None); if you trust "
            f"the file, give a pixel limit that fits it (max_pixels, e.g. {option})"
        )
    return (
        f"{path}: image is {size}, more than the limit of {max_pixels:,} pixels (a guard "
        f"against decompression bombs); if you trust the file, raise the limit (max_pixels, "
        f"e.g. {option})"
    )


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (same mapping as ``PIL.ImageOps.exif_transpose``)."""
    try:
        orientation = img.getexif().get(0x0112, 1)  # ExifTags.Base.Orientation; XMP as fallback
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not lose a readable picture
        return img
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return img.transpose(method) if method is not None else img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode in ``_MODES`` -> RGB; transparency composited onto white (see ``load_image``)."""
    if img.mode in _WIDE_MODES:
        return _wide_to_grey(img).convert("RGB")
    if img.has_transparency_data:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def _wide_to_grey(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit ``L``, scaled by the values' real range.

    ``I;16*``: 0..65535 -> 0..255. ``I`` (32-bit; Pillow reads 16-bit PGM/PNM this way) and
    ``F``: values within 0..65535 are taken as 16-bit, ``F`` values within 0..1 as fractions,
    anything else (negative or larger) is stretched from its min..max. NaN and -inf count as
    the lowest finite value, +inf as the highest. A transparent grey value (16-bit PNG
    ``tRNS``) becomes white, like other transparency.
    """
    values = np.asarray(img)  # (H, W) uint16 / int32 / float32
    grey = values.astype(np.float32)
    finite = np.isfinite(grey)
    if not finite.all():  # float images only
        low, high = (float(grey[finite].min()), float(grey[finite].max())) if finite.any() else (0.0, 0.0)
        grey = np.nan_to_num(grey, nan=low, posinf=high, neginf=low)
    low, high = float(grey.min()), float(grey.max())
    if img.mode == "F" and low >= 0.0 and high <= 1.0:
        grey *= 255.0
    elif img.mode.startswith("I;16") or (low >= 0.0 and high <= 65535.0):
        grey *= 255.0 / 65535.0
    elif high > low:
        grey = (grey - low) * (255.0 / (high - low))
    else:
        grey[:] = 0.0
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    transparent = img.info.get("transparency")
    if isinstance(transparent, int):
        grey[values == transparent] = 255
    return Image.fromarray(grey)


@functools.cache
def _formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)  # AVIF needs a Pillow built with it


def _head(path: str | Path) -> bytes:
    try:
        with open(path, "rb") as fp:
            return fp.read(16)
    except OSError:
        return b""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# Pillow warns about damaged files (corrupt EXIF, truncated metadata) and about large images
# (DecompressionBombWarning, which our own limit replaces). None of that may reach callers, who
# get an image or one ImageReadError. warnings.catch_warnings is not thread-safe before Python
# 3.14 (nested save/restore from several threads leaves filters corrupted), and the datamodules
# check files from a thread pool: so all threads share one "ignore" filter for warnings raised
# from Pillow or from this module, installed while any thread is reading and counted.
_quiet_lock = threading.Lock()
_quiet_depth = 0
_QUIET_FILTER = ("ignore", None, Warning, re.compile(r"(PIL|captioning\.images)(\.|$)"), 0)


@contextlib.contextmanager
def _pillow_warnings_dropped() -> Iterator[None]:
    # No registry reset is needed around the filter: "ignore" records nothing in registries.
    global _quiet_depth
    with _quiet_lock:
        if _quiet_depth == 0:
            cast(list, warnings.filters).insert(0, _QUIET_FILTER)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _QUIET_FILTER in warnings.filters:
                cast(list, warnings.filters).remove(_QUIET_FILTER)


def image_tensor(image: Image.Image, size: int) -> Tensor:
    """PIL RGB -> (3, size, size) uint8 tensor, resized with bilinear filtering (antialiased)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return x.permute(2, 0, 1).contiguous()


def as_unit_float(images: Tensor) -> Tensor:
    """uint8 (…, 3, H, W) in [0, 255] -> float32 in [0, 1]; float input is taken as already in [0, 1]."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


class FollowsEncoder:
    """Datamodule mixin: images are resized to the model encoder's input size.

    :attr:`preprocessing` is the one given to :meth:`use_preprocessing` (e.g. when building a
    feature cache, or in Python outside a Trainer), else the encoder's of the model the
    trainer holds, else :meth:`default_preprocessing`.
    """

    _preprocessing: Preprocessing | None = None

    def default_preprocessing(self) -> Preprocessing:
        return Preprocessing()

    @property
    def preprocessing(self) -> Preprocessing:
        if self._preprocessing is not None:
            return self._preprocessing
        model = getattr(getattr(self, "trainer", None), "lightning_module", None)
        found = getattr(getattr(model, "encoder", None), "preprocessing", None)
        return found if isinstance(found, Preprocessing) else self.default_preprocessing()

    def use_preprocessing(self, preprocessing: Preprocessing) -> None:
        """Resize to this encoder's input size (``dm.use_preprocessing(encoder.preprocessing)``)."""
        if not isinstance(preprocessing, Preprocessing):
            raise TypeError(f"expected a captioning.data.images.Preprocessing, got {type(preprocessing).__name__}")
        if self._preprocessing != preprocessing:
            self.on_preprocessing_change()
        self._preprocessing = preprocessing

    def on_preprocessing_change(self) -> None:
        """Drop anything built for another input size (subclasses)."""

    @property
    def image_size(self) -> int:
        """Side in pixels of the images in batches (the encoder's input size)."""
        return self.preprocessing.image_size
