"""Attention captioning: a Show-Attend-Tell image captioner and a text seq2seq model that share one
attention layer and one batched beam search, trained with PyTorch Lightning.

The public API, importable from here (loaded on first use, so ``import captioning`` stays cheap)::

    from captioning import ImageCaptioner, load_model, caption_images
    model = load_model("runs/shapes")                     # a checkpoint or run folder
    captions = caption_images(model, [PIL.Image.open("photo.jpg")])

Layers (docs/architecture.md): :mod:`captioning.nn` (the maths), :mod:`captioning.models`
(LightningModules), :mod:`captioning.data` (datamodules, vocabularies, images),
:mod:`captioning.eval` (metrics), :mod:`captioning.io` (checkpoints, model folders, outputs),
:mod:`captioning.viz` (pictures), :mod:`captioning.commands` (the command line).
"""

from __future__ import annotations

import importlib
from typing import Any

from captioning import registry  # plain data: imports nothing heavy

# name -> module that defines it: the shipped models, encoders and datamodules (one list, in
# captioning/registry.py), then the rest of the public API.
_API = {
    **{name: module for classes in registry.SHIPPED.values() for name, module in classes.items()},
    # models
    "Translation": "captioning.models.translations",
    "Caption": "captioning.models.inference",
    "caption_images": "captioning.models.inference",
    # loading and sharing
    "load_model": "captioning.io.model_loading",
    "load_pretrained": "captioning.io.model_folders",
    "export_model": "captioning.io.model_folders",
    # the maths
    "Attention": "captioning.nn.attention",
    "MultiHeadAttention": "captioning.nn.attention",
    "SCORERS": "captioning.nn.scores",
    "Scorer": "captioning.nn.scorer",
    "ShowAttendTellDecoder": "captioning.nn.image_decoder",
    "AttentionLSTMDecoder": "captioning.nn.text_decoder",
    "BiLSTMEncoder": "captioning.nn.text_encoder",
    "Encoder": "captioning.nn.encoders",
    "beam_search": "captioning.nn.search",
    "greedy_search": "captioning.nn.search",
    "fused_recurrence": "captioning.nn.recurrence",
    # data
    "Vocabulary": "captioning.data.vocab",
    # evaluation and pictures
    "caption_scores": "captioning.eval.metrics",
    "attention_overlay": "captioning.viz",
    "seq2seq_heatmap": "captioning.viz",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'captioning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
