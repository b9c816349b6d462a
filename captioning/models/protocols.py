"""What the commands need of a trained model, said explicitly instead of probed attribute by attribute.

A model file is rebuilt as whatever class it names (one of ours, or one the user trusts), so
the commands check which of these it provides: ``caption`` and the demo's photo page want a
:class:`Captioner`, ``translate`` and the demo's text page a :class:`Translator`. Our
:class:`~captioning.models.image_captioner.ImageCaptioner` and
:class:`~captioning.models.seq2seq.Seq2SeqModel` provide them; so can a user's model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from captioning.nn.search import SearchResult


@runtime_checkable
class Captioner(Protocol):
    """Captions images: an ``encoder`` (stating its ``preprocessing``) turns images into features;
    ``generate`` decodes them; the result is read back as words, attention grids (T, H, W) per
    image and, with a sentinel, per-word sentinel weights (else None)."""

    encoder: Any

    def generate(
        self,
        features: Tensor,
        beam_size: int | None = None,
        max_length: int | None = None,
        allow_unk: bool | None = None,
    ) -> SearchResult: ...

    def words(self, result: SearchResult) -> list[list[str]]: ...

    def attention_grids(self, result: SearchResult) -> list[Tensor]: ...

    def sentinel_weights(self, result: SearchResult) -> list[list[float]] | None: ...


@runtime_checkable
class Translator(Protocol):
    """Translates raw sentences (``translate``), says how a sentence reaches the model
    (``source_report``: tokens, cuts, unknown words) and encodes sentences (``encode_texts``: a
    ValueError for one that cannot be, e.g. empty)."""

    def translate(
        self,
        texts: Sequence[str],
        beam_size: int | None = None,
        max_length: int | None = None,
        allow_unk: bool | None = None,
    ) -> list[Any]: ...

    def source_report(self, text: str) -> Any: ...

    def encode_texts(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]: ...


def is_captioner(model: Any) -> bool:
    """A :class:`Captioner` whose encoder states its preprocessing (what images it wants)."""
    return isinstance(model, Captioner) and hasattr(model.encoder, "preprocessing")
