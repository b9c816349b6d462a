"""What a translation is and how translations are scored, for the text seq2seq model
(:mod:`captioning.models.seq2seq`), ``translate``, the demo and offline scoring.

Scores: :func:`score_translations` is the one definition, used by validation, test and for
scoring ``translate`` output offline: sacrebleu BLEU and chrF, and exact match = the share of
translations equal to their reference once both are normalised as the model's tokenizer
normalises text (Unicode NFC, whitespace collapsed, lowercased when the tokenizer lowercases).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

from captioning.data.text_vocab import TextTokenizer


def score_translations(
    hypotheses: Sequence[str], references: Sequence[str], tokenizer: TextTokenizer | None = None
) -> dict[str, float | str]:
    """BLEU, chrF, exact match (and the BLEU signature) of translations against raw references,
    both normalised by ``tokenizer.normalize`` (the model's; None: whitespace only). This is
    what validation and test log, and what scoring ``translate`` output against a file uses."""
    from captioning.eval.metrics import text_scores

    norm = tokenizer.normalize if tokenizer is not None else (lambda t: " ".join(t.split()))
    return text_scores([norm(h) for h in hypotheses], [norm(r) for r in references])


class SourceReport(NamedTuple):
    """How a raw source sentence reaches the model: ``tokens`` (without EOS) before cutting,
    ``kept`` how many of them are read, ``unknown`` of ``units`` (``unit``: "words" or
    "characters") never seen in training, ``longest_source`` of training (tokens incl. EOS, or None)."""

    tokens: list[str]
    kept: int
    unknown: int
    units: int
    unit: str
    longest_source: int | None
    unseen_letters: tuple[str, ...] = ()

    @property
    def cut(self) -> bool:
        return self.kept < len(self.tokens)

    def warnings(self) -> list[str]:
        """Plain-language warnings for ``translate`` (empty when the input looks ordinary)."""
        out = []
        n = len(self.tokens)
        if self.cut:
            out.append(
                f"input has {n} tokens, more than the model reads (max_source_length "
                f"{self.kept + 1} incl. end of sentence): only the first {self.kept} are translated"
            )
        elif self.longest_source is not None and n + 1 > self.longest_source:
            out.append(
                f"input has {n} tokens, more than any training source ({self.longest_source - 1}): "
                "expect a poor or shortened translation"
            )
        if self.mostly_unknown:
            out.append(f"{self.unknown} of {self.units} {self.unit} never seen in training: the translation is a guess")
        if self.unseen_letters:
            letters = ", ".join(self.unseen_letters[:8])
            out.append(
                f"letters never seen in training ({letters}): if the training text was written without them "
                "(accents stripped, another script), write the input the same way"
            )
        return out

    @property
    def mostly_unknown(self) -> bool:
        """Every word unknown, or at least 3 and more than half of them: a rare name or two in an
        ordinary sentence is not worth a warning."""
        return self.units > 0 and (self.unknown == self.units or (self.unknown >= 3 and 2 * self.unknown > self.units))


class Translation(NamedTuple):
    """One decoded sentence: ``text`` (detokenised), ``source_tokens`` (S labels incl. ``<eos>``),
    ``target_tokens`` (T generated tokens, ``<eos>`` last when produced), ``alpha`` (T, S), ``score``,
    ``sentinel``: per target token (aligned with ``target_tokens``) the sentinel weight beta in
    [0, 1], how much it relied on the decoder's language state instead of the source; None
    without a sentinel."""

    text: str
    source_tokens: list[str]
    target_tokens: list[str]
    alpha: Tensor
    score: float
    sentinel: list[float] | None = None
