"""Caption PIL images with a trained image captioner: the one path behind ``caption``, ``export``
and the Python API (images resized to the encoder's input size, beam or greedy search over the
whole batch, one attention map per generated word)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from captioning.data.images import image_tensor


@dataclass
class Caption:
    """One captioned image: ``words`` (T,), ``attention`` (T, H, W) per word, ``score`` (sum of
    log-probabilities, length-normalised by the beam search's length penalty), and ``sentinel``
    (T,): per word the weight on the visual sentinel (how much it relied on language instead of
    the image) for models with one, else None."""

    words: list[str]
    attention: Tensor
    score: float
    sentinel: list[float] | None = None

    @property
    def text(self) -> str:
        return " ".join(self.words)


@torch.inference_mode()
def caption_images(
    model: Any,
    images: Sequence[Image.Image],
    beam_size: int | None = None,
    max_length: int | None = None,
    allow_unk: bool | None = None,
) -> list[Caption]:
    """Caption PIL images (any size and mode) in one batch.

    Args:
        model: a :class:`captioning.models.protocols.Captioner`, e.g. an
            :class:`captioning.models.image_captioner.ImageCaptioner` (eval mode; on any device).
        beam_size, max_length, allow_unk: decoding settings; None = the model's own.
    """
    if not images:
        return []
    size = model.encoder.preprocessing.image_size
    device = next(model.parameters()).device
    batch = torch.stack([image_tensor(img, size) for img in images]).to(device)  # (B, 3, S, S) uint8
    result = model.generate(model.encoder(batch), beam_size=beam_size, max_length=max_length, allow_unk=allow_unk)
    betas = model.sentinel_weights(result)
    return [
        Caption(words, grid, float(score), betas[i] if betas is not None else None)
        for i, (words, grid, score) in enumerate(
            zip(model.words(result), model.attention_grids(result), result.scores.tolist())
        )
    ]
