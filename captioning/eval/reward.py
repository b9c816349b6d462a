"""The reward of self-critical training: CIDEr-D of sampled captions against their image's references.

:class:`SelfCriticalReward` wraps :class:`captioning.eval.cider.CiderD` built once on the
training references (the datamodule's ``caption_references("train")``), maps the model's token
ids to the scorer's words once, and scores a batch of token rows on the CPU (a few milliseconds
for 160 captions).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from captioning.errors import UserError
from captioning.eval.cider import CiderD


class SelfCriticalReward:
    """CIDEr-D rewards for token rows of a vocabulary.

    Args:
        references: image id -> reference captions (whitespace-tokenised strings).
        itos: the model's vocabulary (token id -> word).
        eos_id: the end token: a row's words are those before its first EOS.
    """

    def __init__(self, references: Mapping[Hashable, Sequence[str]], itos: Sequence[str], eos_id: int) -> None:
        self.scorer = CiderD(references, extra_words=itos)
        self.word_of_token = np.asarray([self.scorer.words[w] for w in itos], dtype=np.int64)
        self.eos_id = eos_id
        self.row_of = {str(k): i for i, k in enumerate(self.scorer.keys)}

    @classmethod
    def for_model(cls, model: Any, datamodule: Any) -> SelfCriticalReward:
        """The reward for ``model`` (its vocabulary) from the training references of ``datamodule``."""
        refs_of = getattr(datamodule, "caption_references", None)
        if refs_of is None:
            raise UserError(
                f"self_critical: the datamodule ({type(datamodule).__name__}) cannot list its training "
                "references (it has no caption_references(split)); use one of the shipped caption datamodules"
            )
        refs = refs_of("train")
        if not refs:
            raise UserError("self_critical: the training split has no references to reward captions with")
        return cls(refs, model.vocab.itos, model.vocab.eos_id)

    def rows(self, image_ids: Sequence[Hashable]) -> Tensor:
        """Image ids -> (B,) their rows in the scorer (ids compare as strings: 7 and "7" are one image)."""
        try:
            return torch.tensor([self.row_of[str(i)] for i in image_ids], dtype=torch.long)
        except KeyError as err:
            raise UserError(
                f"self_critical: image {err.args[0]!r} of a training batch is not among the training references"
            ) from None

    def score(self, tokens: Tensor, rows: Tensor) -> Tensor:
        """CIDEr-D of each token row (N, T) against the references of image row ``rows`` (N,) -> (N,) float32,
        on ``tokens``' device."""
        ids = tokens.detach().cpu().numpy()
        is_eos = ids == self.eos_id
        words = np.where(is_eos.any(1), is_eos.argmax(1), ids.shape[1])
        mapped = self.word_of_token[ids]
        keys = [self.scorer.keys[r] for r in rows.tolist()]
        scores = self.scorer.score_ids(keys, mapped, words)
        return torch.from_numpy(scores.astype(np.float32)).to(tokens.device)
