"""The base of the attention layer's score functions: what a score owns, the fast-path hooks the
fused recurrence and search call, which of them count (only those defined next to the maths),
and the default backward through autograd. The score functions themselves are in
:mod:`captioning.nn.scores`, which documents the interface.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AutogradScoreBackward", "ScoreBackward", "Scorer", "steps_stacked"]


class ScoreBackward(Protocol):
    """A scorer's backward over the T steps of one sequence, one query per item a step.

    ``step(d_scores (n, 1, S), qp (n, 1, Q)) -> d_qp (n, 1, Q)`` is called once per step (in any
    order) for the first n <= N items (a batch sorted by length shrinks as its short sequences
    end) and accumulates the gradients of the prepared keys and of the score parameters;
    ``finish() -> (d_prepared (N, S, A), d_params)`` returns them, ``d_params`` in
    :meth:`Scorer.score_parameters` order (None where there is no gradient).
    """

    def step(self, d_scores: Tensor, qp: Tensor) -> Tensor: ...

    def finish(self) -> tuple[Tensor, tuple[Tensor | None, ...]]: ...


def steps_stacked(rows: list[Tensor], items: int) -> Tensor:
    """Per-step (n_t, 1, X) tensors of the first n_t items -> (items, T, X), zeros where an item
    took no part in a step."""
    if all(r.shape[0] == items for r in rows):
        return torch.cat(rows, 1)
    out = rows[0].new_zeros(items, len(rows), rows[0].shape[-1])
    for t, r in enumerate(rows):
        out[: r.shape[0], t] = r[:, 0]
    return out


def _owner(cls: type, name: str) -> type:
    return next(k for k in cls.__mro__ if name in vars(k))


class Scorer(nn.Module):
    """Base of the score functions: defaults that make any ``scores`` work on every path."""

    def prepare_keys(self, keys: Tensor) -> Tensor:  # (..., S, Dk) -> (..., S, A)
        return keys

    def query_map(self) -> tuple[Tensor, Tensor | None] | None:
        """(W (Q, Dq), b (Q,) or None): the linear map applied to the query first; None = identity."""
        return None

    def project_query(self, query: Tensor) -> Tensor:  # (..., Dq) -> (..., Q)
        qm = self.query_map()
        return query if qm is None else F.linear(query, qm[0], qm[1])

    def scores(self, qp: Tensor, prepared: Tensor) -> Tensor:
        """Projected queries (..., K, Q), prepared keys (..., S, A) -> scores (..., K, S)."""
        raise NotImplementedError

    def score(self, query: Tensor, prepared: Tensor) -> Tensor:
        """The plain score: queries (..., K, Dq), prepared keys (..., S, A) -> (..., K, S)."""
        return self.scores(self.project_query(query), prepared)

    def score_parameters(self) -> tuple[Tensor, ...]:
        """The parameters ``scores`` reads (default: all; unused ones just get no gradient)."""
        return tuple(self.parameters())

    def scores_paired(self, qp: Tensor, keys: Tensor, position: int) -> Tensor:
        """Each query (..., K, Q) against its own key (..., K, A) at memory index ``position`` -> (..., K)."""
        return self.scores(qp.unsqueeze(-2), keys.unsqueeze(-2)).squeeze(-1).squeeze(-1)

    def new_scratch(self, items: int, queries: int, prepared: Tensor) -> Tensor | None:
        """A buffer ``scores_into`` reuses across steps (None: it needs none)."""
        return None

    def scores_into(self, qp: Tensor, prepared: Tensor, scratch: Tensor | None = None) -> Tensor:
        """No-graph scores: qp (N, K, Q), prepared (N, S, A) -> (N, K, S)."""
        return self.scores(qp, prepared)

    def score_backward(self, prepared: Tensor) -> ScoreBackward:
        """The backward of ``scores`` for a sequence with these prepared keys (N, S, A)."""
        return AutogradScoreBackward(self, prepared)

    # ------------------------------------------------------------------ hook selection
    def offers(self, name: str) -> bool:
        """True when hook ``name`` is this scorer's own, defined next to its ``scores``."""
        return _owner(type(self), name) is _owner(type(self), "scores")

    def hook(self, name: str):
        """The hook to call: the scorer's own when it belongs with its maths, else the default."""
        return getattr(self, name) if self.offers(name) else getattr(Scorer, name).__get__(self)


class AutogradScoreBackward:
    """Any scorer's backward, from autograd through its ``scores`` one step at a time."""

    def __init__(self, scorer: Scorer, prepared: Tensor) -> None:
        self.scorer = scorer
        self.prepared = prepared.detach().requires_grad_(True)
        self.params = scorer.score_parameters()
        self.trained = [p for p in self.params if p.requires_grad]
        self.d_prepared = torch.zeros_like(prepared)
        self.d_params: list[Tensor | None] = [None] * len(self.trained)

    def step(self, d_scores: Tensor, qp: Tensor) -> Tensor:
        n = qp.shape[0]
        with torch.enable_grad():
            q = qp.detach().requires_grad_(True)
            keys = self.prepared if n == self.prepared.shape[0] else self.prepared[:n].detach().requires_grad_(True)
            s = self.scorer.scores(q, keys)
            grads = torch.autograd.grad(s, (q, keys, *self.trained), d_scores, allow_unused=True)
        if grads[1] is not None:
            self.d_prepared[:n] += grads[1]
        for i, g in enumerate(grads[2:]):
            if g is not None:
                before = self.d_params[i]
                self.d_params[i] = g if before is None else before + g
        return torch.zeros_like(qp) if grads[0] is None else grads[0]

    def finish(self) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        found = iter(self.d_params)
        return self.d_prepared, tuple(next(found) if p.requires_grad else None for p in self.params)
