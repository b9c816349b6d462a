"""Pictures of where the model looked: per-word attention overlays and seq2seq heatmaps.
(Over 400 lines on purpose: both pictures share the layout, fonts, colour maps and resampling
below; split apart they would have to agree across modules.)

Everything is drawn with PIL + numpy (matplotlib only supplies colormap tables), so it runs
headless and fast (a 15-word overlay takes well under 0.5 s on one core).

Overlay layout (all sizes in pixels, ``P = panel_size``):
    font  = max(10, P // 10)            line = font + font // 2
    width  = cols * P + (cols + 1) * GAP
    height = header + rows * (P + line) + (rows + 1) * GAP,  header = GAP + n_lines * line
where ``n_lines`` is the number of lines of the optional title plus the wrapped caption, and
``cols x rows`` holds ``1 + T`` panels (the plain image first, then one per word). Each panel
is a ``P x P`` box with the image fitted inside (aspect kept) and its label in a strip below.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

GAP = 6
MAX_COLUMNS = 6
_BACKGROUND = (255, 255, 255)
_SENTINEL = (90, 110, 200)  # the bar of a word's weight on language (the visual sentinel)
_TEXT = (20, 20, 20)

__all__ = ["attention_overlay", "overlay_panel_boxes", "seq2seq_heatmap", "GAP", "MAX_COLUMNS"]


# --------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=8)
def _colormap(name: str) -> np.ndarray:
    """(256, 3) float32 RGB table of a matplotlib colormap (import deferred: it is slow)."""
    import matplotlib

    return matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32)


@functools.lru_cache(maxsize=16)
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    names = ["DejaVuSans-Bold.ttf", "DejaVuSans.ttf"] if bold else ["DejaVuSans.ttf"]
    for name in names:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:  # Pillow >= 10.1 ships a scalable default font
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _text_width(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> float:
    return font.getlength(text)


def _fit_text(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str, width: int) -> str:
    """Shorten ``text`` with an ellipsis so it fits in ``width`` pixels."""
    if _text_width(font, text) <= width:
        return text
    while text and _text_width(font, text + "…") > width:
        text = text[:-1]
    return text + "…"


def _wrap(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a single over-long word is ellipsised."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if _text_width(font, candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = _fit_text(font, word, width)
    if current or not lines:
        lines.append(current)
    return lines


def _to_numpy(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(x, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or inf values")
    return arr


def _image_array(image: Any) -> np.ndarray:
    """PIL image, (3, H, W) float tensor/array in [0, 1], or (H, W, 3) uint8 -> (H, W, 3) uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    is_uint8 = (isinstance(image, np.ndarray) and image.dtype == np.uint8) or (
        isinstance(image, torch.Tensor) and image.dtype == torch.uint8
    )
    arr = _to_numpy(image, "image")
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    elif not (arr.ndim == 3 and arr.shape[-1] == 3):
        raise ValueError(f"image must be a PIL image, (3, H, W) or (H, W, 3); got shape {tuple(arr.shape)}")
    if is_uint8:
        return arr.astype(np.uint8)
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"image tensor values must be in [0, 1] (or uint8), got [{lo:.3f}, {hi:.3f}]; pass the image "
            "as loaded (batches hold uint8 images), not an encoder's normalised input"
        )
    return np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)


def _fit_box(image: np.ndarray, box: int) -> np.ndarray:
    """Resize (H, W, 3) uint8 to fit in a box x box square, keeping the aspect ratio."""
    h, w = image.shape[:2]
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix: bilinear upsampling (half-pixel centres, like align_corners=False)
    followed by a Gaussian blur of a third of an input cell (removes the bilinear ridges, like
    the paper's smoothed figures). Rows sum to 1, so a constant map stays constant."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (pos - i0).astype(np.float64)
    up = np.zeros((n_out, n_in))
    np.add.at(up, (np.arange(n_out), i0), 1 - frac)
    np.add.at(up, (np.arange(n_out), i1), frac)
    sigma = n_out / n_in / 3.0
    if sigma >= 1.0:
        d = np.arange(n_out)[:, None] - np.arange(n_out)[None, :]
        blur = np.exp(-0.5 * (d / sigma) ** 2)
        up = (blur / blur.sum(1, keepdims=True)) @ up
    return up.astype(np.float32)


def _smooth_maps(maps: np.ndarray, height: int, width: int, scale: str = "word") -> np.ndarray:
    """(T, h, w) -> (T, height, width) in [0, 1]: smooth upsampling (two small matrix
    products per map, see :func:`_resample_matrix`), then display scaling:

    * ``"word"``: each map min-max to its own range (shows where each word looked most, even
      when the map is nearly uniform; a constant map becomes a flat 0.5 instead of 0/0);
    * ``"caption"``: every map divided by the largest weight of the whole caption (one
      absolute scale: a nearly uniform map stays dim, a confident peak is bright).
    """
    t, h, w = maps.shape
    if t == 0:
        return np.zeros((0, height, width), np.float32)
    x = _resample_matrix(h, height) @ maps.astype(np.float32) @ _resample_matrix(w, width).T
    if scale == "caption":
        top = float(x.max())
        return np.clip(x / top if top > 1e-12 else np.zeros_like(x), 0.0, 1.0).astype(np.float32)
    flat_in = (maps.reshape(t, -1).max(1) - maps.reshape(t, -1).min(1)) <= 1e-12
    lo = x.reshape(t, -1).min(1)[:, None, None]
    span = x.reshape(t, -1).max(1)[:, None, None] - lo
    flat = flat_in[:, None, None] | (span <= 1e-12)
    out = np.where(flat, 0.5, (x - lo) / np.where(flat, 1.0, span))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _heat(image: np.ndarray, m: np.ndarray, cmap: np.ndarray) -> np.ndarray:
    """Blend a colormap of ``m`` (H, W) in [0, 1] over ``image`` (H, W, 3) uint8, darkening
    the image where attention is low so the attended region stands out even in grey print."""
    img = image.astype(np.float32) / 255.0
    colour = cmap[np.round(m * 255).astype(np.int64)]
    lit = img * (0.4 + 0.6 * m[..., None])
    out = 0.6 * lit + 0.4 * colour
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- public API
def attention_overlay(
    image: Image.Image | torch.Tensor | np.ndarray,
    words: list[str],
    alphas: torch.Tensor | np.ndarray,
    title: str | None = None,
    panel_size: int = 160,
    columns: int | None = None,
    colormap: str = "jet",
    scale: str = "word",
    sentinel: Sequence[float] | None = None,
) -> Image.Image:
    """One picture: the plain image, then one panel per word with its attention heatmap.

    Each word's label carries the map's peak weight (the share of attention on its single
    most attended cell; ``1/(h*w)`` means no preference), so a flat map cannot pass for a
    confident one.

    Args:
        image: PIL image, (3, H, W) float tensor in [0, 1] (denormalised), or (H, W, 3) uint8.
        words: the T caption words; panel ``t + 1`` is labelled ``words[t]``.
        alphas: (T, h, w) attention over the feature grid, one map per word. Each map is
            min-max normalised for display (relative, per word).
        title: optional first header line (e.g. the file name or score).
        panel_size: P, side of each square panel in pixels.
        columns: panels per row; default balances rows with at most ``MAX_COLUMNS`` per row.
        colormap: any matplotlib colormap name.
        scale: ``"word"`` (each panel to its own maximum) or ``"caption"`` (one scale for all
            panels: brightness is comparable across words).
        sentinel: per word, the weight beta_t on the visual sentinel (adaptive attention: how
            much the word relied on language instead of the image), drawn as a bar under the
            panel (full = language only).

    Returns:
        RGB image of the size given in the module docstring.
    """
    words = [str(w) for w in words]
    a = _to_numpy(alphas, "alphas")
    if scale not in ("word", "caption"):
        raise ValueError(f"scale must be 'word' or 'caption', got {scale!r}")
    betas = None if sentinel is None else [float(b) for b in _to_numpy(sentinel, "sentinel").reshape(-1)]
    if betas is not None and len(betas) != len(words):
        raise ValueError(f"got {len(words)} words but {len(betas)} sentinel weights; they must match")
    if a.ndim != 3:
        raise ValueError(
            f"alphas must be (T, h, w), one map per word; got shape {tuple(a.shape)} "
            "(reshape a (T, S) decoder output to the feature grid first)"
        )
    if a.shape[0] != len(words):
        raise ValueError(f"got {len(words)} words but {a.shape[0]} attention maps; they must match")
    if panel_size < 16:
        raise ValueError(f"panel_size must be >= 16 pixels, got {panel_size}")
    n = len(words) + 1
    columns, rows = _panel_grid(n, columns)
    line = _line_height(panel_size)
    below = _below_panel(panel_size, betas is not None)
    fsize = max(10, panel_size // 10)
    font, bold = _font(fsize), _font(fsize, bold=True)
    width = columns * panel_size + (columns + 1) * GAP
    caption = " ".join(words) if words else "(empty caption)"
    header_lines = [(text, bold) for text in _wrap(bold, title, width - 2 * GAP)] if title else []
    header_lines += [(text, font) for text in _wrap(font, caption, width - 2 * GAP)]
    header = GAP + len(header_lines) * line
    height = header + rows * (panel_size + below) + (rows + 1) * GAP

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, (text, f) in enumerate(header_lines):
        draw.text((GAP, GAP + i * line + line // 2), text, fill=_TEXT, font=f, anchor="lm")

    base = _fit_box(_image_array(image), panel_size)
    bh, bw = base.shape[:2]
    maps = _smooth_maps(a, bh, bw, scale)
    cmap = _colormap(colormap)
    peaks = a.reshape(len(words), -1).max(1) if words else []
    labels = ["(image)"] + [f"{w} {p:.2f}" for w, p in zip(words, peaks)]
    bar = below - line
    for k, (x0, y0, _, _) in enumerate(_panel_boxes(n, columns, header, panel_size, bar)):
        pixels = base if k == 0 else _heat(base, maps[k - 1], cmap)
        canvas.paste(Image.fromarray(pixels), (x0 + (panel_size - bw) // 2, y0 + (panel_size - bh) // 2))
        if betas is not None and k > 0:  # sentinel bar: grey track, filled share = beta (language)
            top = y0 + panel_size + 2
            draw.rectangle((x0, top, x0 + panel_size - 1, top + bar - 4), fill=(225, 225, 225))
            draw.rectangle(
                (x0, top, x0 + round((panel_size - 1) * min(max(betas[k - 1], 0.0), 1.0)), top + bar - 4),
                fill=_SENTINEL,
            )
        label = _fit_text(font, labels[k], panel_size)
        draw.text((x0 + panel_size // 2, y0 + panel_size + bar + line // 2), label, fill=_TEXT, font=font, anchor="mm")
    return canvas


def _panel_grid(n: int, columns: int | None) -> tuple[int, int]:
    """(columns, rows) for ``n`` panels; default: balanced rows of at most ``MAX_COLUMNS``."""
    if columns is None:
        columns = math.ceil(n / math.ceil(n / MAX_COLUMNS))
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    columns = min(columns, n)
    return columns, math.ceil(n / columns)


def _line_height(panel_size: int) -> int:
    fsize = max(10, panel_size // 10)
    return fsize + fsize // 2


def _below_panel(panel_size: int, sentinel: bool) -> int:
    """Height under each panel: its label line, plus the sentinel bar when there is one."""
    return _line_height(panel_size) + (max(8, panel_size // 16) if sentinel else 0)


def _panel_boxes(n: int, columns: int, header: int, panel_size: int, bar: int = 0) -> list[tuple[int, int, int, int]]:
    below = _line_height(panel_size) + bar
    boxes = []
    for k in range(n):
        r, c = divmod(k, columns)
        x0 = GAP + c * (panel_size + GAP)
        y0 = header + GAP + r * (panel_size + below + GAP)
        boxes.append((x0, y0, x0 + panel_size, y0 + panel_size))
    return boxes


def overlay_panel_boxes(
    size: tuple[int, int], n_words: int, panel_size: int = 160, columns: int | None = None, sentinel: bool = False
) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of the ``1 + n_words`` panels of an :func:`attention_overlay`
    picture of ``size`` (width, height): panel 0 is the plain image, panel ``t + 1`` word t's
    heatmap; ``sentinel``: the picture has sentinel bars. The header (title and caption lines)
    is whatever height remains above the panels. Raises ValueError when ``size`` cannot be
    such a picture."""
    n = n_words + 1
    columns, rows = _panel_grid(n, columns)
    width, height = size
    bar = _below_panel(panel_size, sentinel) - _line_height(panel_size)
    header = height - rows * (panel_size + _line_height(panel_size) + bar) - (rows + 1) * GAP
    if width != columns * panel_size + (columns + 1) * GAP or header < GAP:
        raise ValueError(
            f"a {width}x{height} picture is not an overlay of {n_words} word(s) at panel size {panel_size}"
        )
    return _panel_boxes(n, columns, header, panel_size, bar)


def seq2seq_heatmap(
    source_tokens: list[str],
    target_tokens: list[str],
    alpha: torch.Tensor | np.ndarray,
    colormap: str = "inferno",
    sentinel: Sequence[float] | torch.Tensor | np.ndarray | None = None,
) -> Image.Image:
    """Attention matrix of a text seq2seq model as a labelled heatmap (Bahdanau et al. style).

    Args:
        source_tokens: the S source tokens (columns, labels written vertically on top).
        target_tokens: the T generated tokens (rows, labels on the left).
        alpha: (T, S) attention weights; colours run from 0 to the largest weight, shown on
            the colour bar on the right.
        sentinel: optional (T,) per target token, the sentinel weight beta in [0, 1] (how much
            the token relied on the decoder's language state instead of the source). Drawn as
            a narrow column labelled "language" right of the heatmap: per row a grey track whose
            filled share is beta (full = language only), as the overlays' sentinel bars.
    """
    src, tgt = [str(t) for t in source_tokens], [str(t) for t in target_tokens]
    a = _to_numpy(alpha, "alpha")
    if a.ndim != 2 or a.shape != (len(tgt), len(src)):
        raise ValueError(
            f"alpha must be (T, S) = ({len(tgt)}, {len(src)}) for {len(tgt)} target and "
            f"{len(src)} source tokens; got shape {tuple(a.shape)}"
        )
    betas = None if sentinel is None else _to_numpy(sentinel, "sentinel").reshape(-1)
    if betas is not None and betas.shape[0] != len(tgt):
        raise ValueError(f"got {len(tgt)} target tokens but {betas.shape[0]} sentinel weights; they must match")
    t, s = a.shape
    cell = int(min(32, max(12, 480 // max(t, s, 1))))
    fsize = max(9, min(14, int(cell * 0.6)))
    font = _font(fsize)
    column_label = ["language"] if betas is not None else []
    label_w = min(200, math.ceil(max([_text_width(font, w) for w in src + tgt + column_label] + [10])) + 2 * GAP)
    bar_w, bar_gap = 12, 2 * GAP
    col_w = 2 * cell if betas is not None else 0  # the sentinel column
    col_space = GAP + col_w if betas is not None else 0
    vmax = float(a.max()) if a.size else 0.0
    vtext = f"{vmax:.2f}"
    width = label_w + s * cell + col_space + bar_gap + bar_w + GAP + int(_text_width(font, vtext)) + GAP
    height = label_w + max(t * cell, 4 * cell) + GAP

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    cmap = _colormap(colormap)
    x0, y0 = label_w, label_w
    if a.size:
        norm = a / vmax if vmax > 0 else np.zeros_like(a)
        grid = (cmap[np.round(np.clip(norm, 0, 1) * 255).astype(np.int64)] * 255).astype(np.uint8)
        cells = Image.fromarray(grid).resize((s * cell, t * cell), Image.Resampling.NEAREST)
        canvas.paste(cells, (x0, y0))
    for i, word in enumerate(tgt):
        draw.text(
            (x0 - GAP, y0 + i * cell + cell // 2),
            _fit_text(font, word, label_w - 2 * GAP),
            fill=_TEXT,
            font=font,
            anchor="rm",
        )

    def column_label_at(x: int, word: str) -> None:
        # Vertical labels: draw horizontally on a strip, rotate, paste above the column at x.
        text = _fit_text(font, word, label_w - 2 * GAP)
        strip = Image.new("RGB", (label_w - GAP, cell), _BACKGROUND)
        ImageDraw.Draw(strip).text((GAP, cell // 2), text, fill=_TEXT, font=font, anchor="lm")
        canvas.paste(strip.rotate(90, expand=True), (x, 0))

    for j, word in enumerate(src):
        column_label_at(x0 + j * cell, word)
    if betas is not None:  # per row: grey track, filled share = beta (language)
        cx = x0 + s * cell + GAP
        column_label_at(cx + (col_w - cell) // 2, column_label[0])
        for i, beta in enumerate(np.clip(betas, 0.0, 1.0)):
            top, bottom = y0 + i * cell + 1, y0 + (i + 1) * cell - 2
            draw.rectangle((cx, top, cx + col_w - 1, bottom), fill=(225, 225, 225))
            filled = round(col_w * float(beta))
            if filled:
                draw.rectangle((cx, top, cx + filled - 1, bottom), fill=_SENTINEL)
    # colour bar (of the heatmap): 0 at the bottom, vmax at the top
    bx, bh = x0 + s * cell + col_space + bar_gap, max(t * cell, 4 * cell)
    ramp = (cmap[np.linspace(255, 0, bh).round().astype(np.int64)] * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(ramp[:, None, :], bar_w, axis=1)), (bx, y0))
    draw.text((bx + bar_w + GAP // 2, y0), vtext, fill=_TEXT, font=font, anchor="lt")
    draw.text((bx + bar_w + GAP // 2, y0 + bh), "0", fill=_TEXT, font=font, anchor="lb")
    return canvas
