"""The result files of ``caption``, ``translate`` and the demo: one picture and one JSON record
per input, written by :func:`captioning.io.outputs.write_result_pair` (free names, never over
a user's file, temp file + rename).

Caption JSON: ``{"image", "caption", "words", "grid_size": [h, w], "attention": (T, h, w)
nested lists rounded to 5 decimals, "peak": per word its largest weight, "score"}`` (a
non-finite score is written as null), plus ``"sentinel"`` (beta per word) for models with one.

Translation JSON: ``{"input", "source", "translation", "source_tokens", "target_tokens",
"attention": (T, S), "score"}``, plus ``"sentinel"`` (beta per target token).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from captioning.io.outputs import safe_stem, write_result_pair


def _plain(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or inf values")
    return a


def caption_record(
    image_path: str | Path,
    words: Sequence[str],
    attention: Any,
    score: float | None = None,
    sentinel: Sequence[float] | None = None,
) -> dict:
    """The JSON record of one captioned image (module docstring); attention (T, h, w)."""
    words = [str(w) for w in words]
    a = _plain(attention, "alphas")
    if a.ndim != 3 or a.shape[0] != len(words):
        raise ValueError(
            f"{image_path}: got {len(words)} words but alphas of shape {tuple(a.shape)}; "
            "expected (T, h, w) with T == number of words"
        )
    if score is not None:
        score = float(score)
        score = score if math.isfinite(score) else None
    record = {
        "image": str(image_path),
        "caption": " ".join(words),
        "words": words,
        "grid_size": [int(a.shape[1]), int(a.shape[2])],
        "attention": np.round(a, 5).tolist(),
        "peak": [round(float(p), 5) for p in a.reshape(len(words), -1).max(1)] if words else [],
        "score": score,
    }
    if sentinel is not None:
        record["sentinel"] = [round(float(b), 5) for b in _plain(sentinel, "sentinel").reshape(-1)]
    return record


def write_caption_result(
    output_dir: str | Path,
    image_path: str | Path,
    words: Sequence[str],
    alphas: Any,
    image: Image.Image | torch.Tensor | np.ndarray | None = None,
    score: float | None = None,
    overwrite: bool = False,
    remember: bool = True,
    sentinel: Sequence[float] | None = None,
    scale: str = "word",
) -> tuple[Path, Path]:
    """Write ``<stem>.png`` (the attention overlay, :func:`captioning.viz.attention_overlay`) and
    ``<stem>.json`` (:func:`caption_record`) for one captioned image.

    Existing files are never replaced unless ``overwrite``; a free name ``<stem>-1``, ... is
    used instead. ``image``: the picture (default: ``image_path`` read with
    :func:`captioning.data.images.load_image`). Returns the (png, json) paths written.
    """
    from captioning.viz import attention_overlay

    record = caption_record(image_path, words, alphas, score, sentinel)
    if image is None:
        from captioning.data.images import load_image

        image = load_image(image_path)
    overlay = attention_overlay(
        image, record["words"], alphas, title=Path(image_path).name, scale=scale, sentinel=sentinel
    )
    return write_result_pair(
        output_dir, safe_stem(image_path), str(Path(image_path).resolve()), overlay, record, overwrite, remember
    )


def translation_record(tr: Any, label: str, source: str) -> dict:
    """The JSON record of one translation (:class:`captioning.models.translations.Translation`)."""
    record = {
        "input": label,
        "source": source,
        "translation": tr.text,
        "source_tokens": tr.source_tokens,
        "target_tokens": tr.target_tokens,
        "attention": tr.alpha.round(decimals=5).tolist(),
        "score": tr.score,
    }
    if tr.sentinel is not None:
        record["sentinel"] = [round(float(b), 5) for b in tr.sentinel]
    return record


def sentence_stem(text: str, limit: int = 40) -> str:
    """A file-name stem from a sentence (words joined by '-', at most ``limit`` characters)."""
    return re.sub(r"[^\w]+", "-", text.lower()).strip("-")[:limit] or "sentence"


def write_translation_result(
    output_dir: str | Path, stem: str, tr: Any, label: str, source: str, overwrite: bool = False, remember: bool = True
) -> tuple[Path, Path]:
    """Write ``<stem>.png`` (the source x target heatmap, :func:`captioning.viz.seq2seq_heatmap`)
    and ``<stem>.json`` (:func:`translation_record`). Returns the (png, json) paths written."""
    from captioning.viz import seq2seq_heatmap

    figure = seq2seq_heatmap(tr.source_tokens, tr.target_tokens, tr.alpha, sentinel=tr.sentinel)
    return write_result_pair(
        output_dir, stem, source, figure, translation_record(tr, label, source), overwrite, remember
    )
