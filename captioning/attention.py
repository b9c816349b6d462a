"""One attention layer for images and text; every score function owns all of its maths.

A score function is a :class:`Scorer`. Its maths, all in its own class:

* ``prepare_keys(keys (..., S, Dk)) -> (..., S, A)``: query-independent work, once per memory;
* ``query_map() -> (W (Q, Dq), b (Q,) | None) | None``: the linear first stage applied to the
  query (None: the query is used as is); ``project_query`` applies it;
* ``scores(qp (..., K, Q), prepared (..., S, A)) -> (..., K, S)``: the score of projected queries,
  plain autograd maths. ``score(query, prepared)`` = ``scores(project_query(query), prepared)``.

and its fast-path hooks (see docs/attention.md), which the fused training recurrence
(:mod:`captioning.sat_recurrence`) and search (through :meth:`Attention.attend`) call, so no
score formula is written anywhere else:

* ``scores_into(qp (N, K, Q), prepared (N, S, A), scratch) -> (N, K, S)``: no-graph scores,
  e.g. without large temporaries (default: ``scores``); ``new_scratch`` sizes its buffer;
* ``score_backward(prepared (N, S, A)) -> ScoreBackward``: the backward of ``scores`` over the T
  steps of a sequence, hand-written where it pays (default: autograd through ``scores``);
* ``scores_paired(qp (..., K, Q), keys (..., K, A), position) -> (..., K)``: each query against
  its own extra key, at memory position ``position`` (the visual sentinel);
* ``score_parameters()``: the parameters ``scores`` uses.

A fast hook counts only if it belongs with the maths: defined by the class that defines
``scores`` (or the base default, derived from ``scores``). A subclass that changes ``scores``
alone therefore stays right on every path; one that wants its own fast path overrides the
hooks next to its maths (tests/test_scorer_hooks.py shows both).

:class:`Attention` puts a scorer behind the one masked-softmax-and-context path
(:func:`attend_projected`); :class:`MultiHeadAttention` adds per-head projections around any
scorer. Both are stateless: ``prepare`` returns the projected keys (a :class:`PreparedMemory`).

Mask convention (everywhere in this package): boolean, ``True`` = may attend. Masked
positions get exactly 0 weight; a fully masked row gets all zeros (and a zero context),
never NaN.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SCORERS",
    "Attention",
    "AttentionOutput",
    "MultiHeadAttention",
    "PreparedMemory",
    "ScoreBackward",
    "Scorer",
    "attend_projected",
    "build_attention",
    "masked_softmax",
    "softmax_backward",
]

# Size of an additive scorer's scratch (elements): 8 MB in float32, fits the last-level cache;
# larger chunks fall out of it, smaller ones mean more (parallel) ops per step.
SCRATCH_ELEMENTS = 1 << 21


def masked_softmax(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over the last dim with a boolean mask (True = may attend).

    Args:
        scores: (..., S) raw scores.
        mask: broadcastable to ``scores``; None means attend everywhere.
    Returns:
        (..., S) weights; masked positions are exactly 0 and an all-masked row is all 0.
    """
    if mask is None:
        return torch.softmax(scores, dim=-1)
    # A large finite negative instead of -inf: exp underflows to exactly 0 for masked
    # positions, and an all-masked row stays finite (uniform) before we zero it below.
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1) * mask.to(scores.dtype)


def softmax_backward(weights: Tensor, d_weights: Tensor) -> Tensor:
    """Gradient of the scores given :func:`masked_softmax`'s output (..., S) and its gradient.
    Masked positions (weight 0) and all-masked rows get exactly 0."""
    return weights * (d_weights - (weights * d_weights).sum(-1, keepdim=True))


# --------------------------------------------------------------------------- scorers
class ScoreBackward(Protocol):
    """A scorer's backward over the T steps of one sequence, one query per item a step.

    ``step(d_scores (N, 1, S), qp (N, 1, Q)) -> d_qp (N, 1, Q)`` is called once per step (in any
    order) and accumulates the gradients of the prepared keys and of the score parameters;
    ``finish() -> (d_prepared (N, S, A), d_params)`` returns them, ``d_params`` in
    :meth:`Scorer.score_parameters` order (None where there is no gradient).
    """

    def step(self, d_scores: Tensor, qp: Tensor) -> Tensor: ...

    def finish(self) -> tuple[Tensor, tuple[Tensor | None, ...]]: ...


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
        with torch.enable_grad():
            q = qp.detach().requires_grad_(True)
            s = self.scorer.scores(q, self.prepared)
            grads = torch.autograd.grad(s, (q, self.prepared, *self.trained), d_scores, allow_unused=True)
        if grads[1] is not None:
            self.d_prepared += grads[1]
        for i, g in enumerate(grads[2:]):
            if g is not None:
                self.d_params[i] = g if self.d_params[i] is None else self.d_params[i] + g
        return torch.zeros_like(qp) if grads[0] is None else grads[0]

    def finish(self) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        found = iter(self.d_params)
        return self.d_prepared, tuple(next(found) if p.requires_grad else None for p in self.params)


class _ProductScorer(Scorer):
    """``scale * q . k`` against prepared keys: dot, scaled dot and (with a key projection) general."""

    class Backward:
        """Backward of ``scale * qp @ K^T``: d qp per step; d K once over all steps (one bmm)."""

        def __init__(self, prepared: Tensor, scale: float) -> None:
            self.keys, self.scale = prepared.detach(), scale
            self.d_scores: list[Tensor] = []
            self.queries: list[Tensor] = []

        @torch.no_grad()
        def step(self, d_scores: Tensor, qp: Tensor) -> Tensor:
            self.d_scores.append(d_scores)
            self.queries.append(qp)
            return torch.bmm(d_scores, self.keys) * self.scale  # (N, 1, S) @ (N, S, Q)

        @torch.no_grad()
        def finish(self) -> tuple[Tensor, tuple[Tensor | None, ...]]:
            d_s, q = torch.cat(self.d_scores, 1), torch.cat(self.queries, 1)  # (N, T, S), (N, T, Q)
            return torch.bmm(d_s.transpose(1, 2), q) * self.scale, ()

    scale = 1.0

    def scores(self, qp: Tensor, prepared: Tensor) -> Tensor:
        # (..., K, Q) @ (..., Q, S) -> (..., K, S)
        s = torch.matmul(qp, prepared.transpose(-1, -2))
        return s if self.scale == 1.0 else s * self.scale

    def score_parameters(self) -> tuple[Tensor, ...]:
        return ()

    def score_backward(self, prepared: Tensor) -> ScoreBackward:
        return _ProductScorer.Backward(prepared, self.scale)


class DotScorer(_ProductScorer):
    """Luong "dot": ``q . k``. Needs ``query_dim == key_dim``."""

    scale_by_dim = False

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int | None = None, **_: object) -> None:
        super().__init__()
        if query_dim != key_dim:
            raise ValueError(
                f"score '{'scaled_dot' if self.scale_by_dim else 'dot'}' needs query_dim == key_dim, "
                f"got {query_dim} and {key_dim}; use 'general' or 'additive', or multi-head projections"
            )
        self.scale = 1.0 / math.sqrt(key_dim) if self.scale_by_dim else 1.0


class ScaledDotScorer(DotScorer):
    """Vaswani et al.: ``q . k / sqrt(d)``."""

    scale_by_dim = True


class GeneralScorer(_ProductScorer):
    """Luong "general": ``q^T W k``; ``W k`` is computed once per sequence."""

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int | None = None, **_: object) -> None:
        super().__init__()
        self.key_proj = nn.Linear(key_dim, query_dim, bias=False)

    def prepare_keys(self, keys: Tensor) -> Tensor:  # (..., S, Dk) -> (..., S, Dq)
        return self.key_proj(keys)


class AdditiveScorer(Scorer):
    """Bahdanau "concat": ``v^T tanh(W1 q + W2 k)``; ``W2 k`` is computed once per sequence.

    Written ``tanh(x) = 2 sigmoid(2x) - 1`` with the affine part folded into v: the same function,
    but the (..., K, S, A) tensor is the largest of a decoding step and PyTorch's CPU sigmoid is
    ~6x faster than its tanh. Scores differ from torch.tanh's by rounding only.
    """

    class Backward:
        """Backward of :meth:`AdditiveScorer.scores` (see there for the sigmoid form).

        Per step: e = 2 sig @ v - sum(v), sig = sigmoid(2q + 2K), recomputed (cheaper than storing
        T copies of the (N, S, A) tensor), a cache-sized chunk of items at a time. d v = 2 d_e @ sig
        - sum(d_e); d(q + K) = 4 v sig (1 - sig) d_e, whose factor v is applied to the key gradient
        once at the end, not every step.
        """

        def __init__(self, prepared: Tensor, v: Tensor) -> None:
            prepared = prepared.detach()
            self.keys2, self.v = 2 * prepared, v.detach().to(prepared.dtype)
            self.d_pre = torch.zeros_like(prepared)  # sum over steps of d(pre-activation) / v
            self.d_v = torch.zeros_like(self.v)
            per_item = prepared.shape[-2] * prepared.shape[-1]
            n = max(1, min(prepared.shape[0], SCRATCH_ELEMENTS // per_item))
            self.buf = prepared.new_empty(n, *prepared.shape[1:])  # (n, S, A) scratch reused every step

        @torch.no_grad()
        def step(self, d_scores: Tensor, qp: Tensor) -> Tensor:  # (N, 1, S), (N, 1, A)
            items, chunk, a = self.keys2.shape[0], self.buf.shape[0], self.keys2.shape[-1]
            d_v_rows, d_q = d_scores.new_empty(items, 1, a), d_scores.new_empty(items, 1, a)
            for i in range(0, items, chunk):
                j = min(i + chunk, items)
                d_e = d_scores[i:j]
                sig = torch.add(self.keys2[i:j], qp[i:j], alpha=2, out=self.buf[:j - i]).sigmoid_()
                torch.bmm(d_e, sig, out=d_v_rows[i:j])
                sig_grad = sig.addcmul_(sig, sig, value=-1)  # sig - sig^2, in place
                torch.bmm(d_e, sig_grad, out=d_q[i:j])
                self.d_pre[i:j].addcmul_(sig_grad, d_e.transpose(1, 2), value=4)
            self.d_v += 2 * d_v_rows.sum((0, 1)) - d_scores.sum()
            return 4 * self.v * d_q

        def finish(self) -> tuple[Tensor, tuple[Tensor | None, ...]]:
            return self.d_pre.mul_(self.v), (self.d_v.view(1, -1),)

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int, **_: object) -> None:
        super().__init__()
        self.key_proj = nn.Linear(key_dim, attention_dim)
        self.query_proj = nn.Linear(query_dim, attention_dim, bias=False)
        self.v = nn.Linear(attention_dim, 1, bias=False)

    def prepare_keys(self, keys: Tensor) -> Tensor:  # (..., S, Dk) -> (..., S, A)
        return self.key_proj(keys)

    def query_map(self) -> tuple[Tensor, Tensor | None]:
        return self.query_proj.weight, None

    def score_parameters(self) -> tuple[Tensor, ...]:
        return (self.v.weight,)

    def scores(self, qp: Tensor, prepared: Tensor) -> Tensor:
        sig = torch.sigmoid(torch.add(2 * qp.unsqueeze(-2), prepared.unsqueeze(-3), alpha=2))  # (..., K, S, A)
        return 2 * self.v(sig).squeeze(-1) - self.v.weight.sum()  # (..., K, S)

    def new_scratch(self, items: int, queries: int, prepared: Tensor) -> Tensor:
        per_item = queries * prepared.shape[-2] * prepared.shape[-1]
        n = max(1, min(items, SCRATCH_ELEMENTS // per_item))  # a few items at a time: stays in cache
        return prepared.new_empty(n, queries, *prepared.shape[-2:])

    @torch.no_grad()
    def scores_into(self, qp: Tensor, prepared: Tensor, scratch: Tensor | None = None) -> Tensor:
        """:meth:`scores` without the (N, K, S, A) intermediate: items are scored a chunk at a time
        in ``scratch`` (n, K, S, A), small enough to stay in cache (a fresh 77 MB tensor per
        beam step costs page faults, several times the arithmetic)."""
        if scratch is None:
            scratch = self.new_scratch(qp.shape[0], qp.shape[1], prepared)
        q2 = 2 * qp.unsqueeze(2)  # (N, K, 1, A)
        v = self.v.weight.view(-1)
        v2 = 2 * v.to(scratch.dtype)
        b, n = q2.shape[0], scratch.shape[0]
        scores = q2.new_empty(b, q2.shape[1], prepared.shape[1], dtype=scratch.dtype)  # (N, K, S)
        for i in range(0, b, n):
            m = min(n, b - i)
            sig = torch.add(q2[i:i + m], prepared[i:i + m].unsqueeze(1), alpha=2, out=scratch[:m]).sigmoid_()
            torch.matmul(sig, v2, out=scores[i:i + m])  # 2 sigmoid(2q + 2K) @ v
        return scores.to(torch.promote_types(scores.dtype, torch.float32)).sub_(v.sum())  # >= fp32

    def score_backward(self, prepared: Tensor) -> ScoreBackward:
        return AdditiveScorer.Backward(prepared, self.v.weight.view(-1))


class ContentScorer(Scorer):
    """Graves "content-based": ``beta * cosine(W q, k)``.

    The query is projected to the key size when the two differ; ``beta`` (a learned
    sharpness, kept positive through softplus) lets the weights become peaked, since
    cosine alone lies in [-1, 1].
    """

    class Backward:
        """Backward of ``softplus(r) * normalize(qp) @ K^T`` (K unit rows, prepared)."""

        def __init__(self, scorer: ContentScorer, prepared: Tensor) -> None:
            self.keys, self.raw = prepared.detach(), scorer.raw_beta
            self.beta = F.softplus(self.raw.detach()).to(prepared.dtype)
            self.d_raw = torch.zeros((), dtype=prepared.dtype, device=prepared.device)
            self.d_scores: list[Tensor] = []
            self.units: list[Tensor] = []

        @torch.no_grad()
        def step(self, d_scores: Tensor, qp: Tensor) -> Tensor:
            norm = qp.norm(dim=-1, keepdim=True)
            unit = qp / norm.clamp_min(ContentScorer.eps)
            cos = torch.bmm(unit, self.keys.transpose(1, 2))  # (N, 1, S)
            self.d_raw += (d_scores * cos).sum()
            self.d_scores.append(d_scores)
            self.units.append(unit)
            d_unit = self.beta * torch.bmm(d_scores, self.keys)  # (N, 1, Q)
            # normalize: x / max(|x|, eps): (I - u u^T) / |x| above eps, I / eps below it.
            radial = (d_unit - unit * (unit * d_unit).sum(-1, keepdim=True)) / norm.clamp_min(ContentScorer.eps)
            return torch.where(norm >= ContentScorer.eps, radial, d_unit / ContentScorer.eps)

        @torch.no_grad()
        def finish(self) -> tuple[Tensor, tuple[Tensor | None, ...]]:
            d_s, u = torch.cat(self.d_scores, 1), torch.cat(self.units, 1)
            d_keys = self.beta * torch.bmm(d_s.transpose(1, 2), u)
            return d_keys, ((self.d_raw * torch.sigmoid(self.raw.detach())).to(self.raw.dtype).view_as(self.raw),)

    eps = 1e-6

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int | None = None, **_: object) -> None:
        super().__init__()
        self.query_proj = nn.Linear(query_dim, key_dim, bias=False) if query_dim != key_dim else None
        self.raw_beta = nn.Parameter(torch.tensor(math.log(math.expm1(5.0))))

    def prepare_keys(self, keys: Tensor) -> Tensor:  # (..., S, Dk), unit length
        return F.normalize(keys, dim=-1, eps=self.eps)

    def query_map(self) -> tuple[Tensor, Tensor | None] | None:
        return None if self.query_proj is None else (self.query_proj.weight, None)

    def score_parameters(self) -> tuple[Tensor, ...]:
        return (self.raw_beta,)

    def scores(self, qp: Tensor, prepared: Tensor) -> Tensor:
        q = F.normalize(qp, dim=-1, eps=self.eps)  # (..., K, Dk)
        return F.softplus(self.raw_beta) * torch.matmul(q, prepared.transpose(-1, -2))

    def score_backward(self, prepared: Tensor) -> ScoreBackward:
        return ContentScorer.Backward(self, prepared)


class LocationScorer(Scorer):
    """Luong "location": ``W q`` gives one score per source position; keys are ignored.

    Needs ``max_positions`` >= the longest source (for images: the grid size H*W; one more for
    a sentinel, which is scored at position S).
    """

    class Backward:
        def __init__(self, prepared: Tensor) -> None:
            self.prepared = prepared

        @torch.no_grad()
        def step(self, d_scores: Tensor, qp: Tensor) -> Tensor:
            d = torch.zeros_like(qp)
            d[..., : d_scores.shape[-1]] = d_scores
            return d

        @torch.no_grad()
        def finish(self) -> tuple[Tensor, tuple[Tensor | None, ...]]:
            return torch.zeros_like(self.prepared), ()

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int | None = None,
                 max_positions: int | None = None, **_: object) -> None:
        super().__init__()
        if not max_positions:
            raise ValueError("score 'location' needs max_positions (the longest source / the grid H*W)")
        self.max_positions = max_positions
        self.proj = nn.Linear(query_dim, max_positions)

    def prepare_keys(self, keys: Tensor) -> Tensor:
        if keys.shape[-2] > self.max_positions:
            raise ValueError(
                f"source has {keys.shape[-2]} positions but score 'location' was built for "
                f"max_positions={self.max_positions}"
            )
        return keys.new_zeros(*keys.shape[:-1], 0)  # (..., S, 0): only S matters

    def query_map(self) -> tuple[Tensor, Tensor | None]:
        return self.proj.weight, self.proj.bias

    def score_parameters(self) -> tuple[Tensor, ...]:
        return ()

    def scores(self, qp: Tensor, prepared: Tensor) -> Tensor:
        return qp[..., : prepared.shape[-2]]  # (..., K, S)

    def scores_paired(self, qp: Tensor, keys: Tensor, position: int) -> Tensor:
        if position >= self.max_positions:
            raise ValueError(f"score 'location' has max_positions={self.max_positions}, too few for an extra "
                             f"position {position} (a sentinel needs the grid size + 1)")
        return qp[..., position]

    def score_backward(self, prepared: Tensor) -> ScoreBackward:
        return LocationScorer.Backward(prepared)


SCORERS: dict[str, type[Scorer]] = {
    "dot": DotScorer,
    "scaled_dot": ScaledDotScorer,
    "general": GeneralScorer,
    "additive": AdditiveScorer,
    "content": ContentScorer,
    "location": LocationScorer,
}
SCORE_ALIASES = {"bahdanau": "additive", "concat": "additive", "cosine": "content", "luong": "general"}


def compares_directly(score: str, num_heads: int = 1) -> bool:
    """True when the score multiplies query and key directly (dot, scaled dot), so a
    single-head layer needs ``query_dim == key_dim``; the decoders bridge the sizes."""
    return num_heads == 1 and SCORE_ALIASES.get(score, score) in ("dot", "scaled_dot")


def _make_scorer(score: str, query_dim: int, key_dim: int, attention_dim: int, max_positions: int | None) -> Scorer:
    name = SCORE_ALIASES.get(score, score)
    if name not in SCORERS:
        raise ValueError(f"unknown attention score {score!r}; choose one of {sorted(SCORERS)} or 'none'")
    return SCORERS[name](query_dim, key_dim, attention_dim, max_positions=max_positions)


# --------------------------------------------------------------------------- the one attention path
class PreparedMemory(NamedTuple):
    """What ``prepare`` returns and every step reuses.

    keys: (B, S, A) scorer-specific key projection (multi-head: (B, H, S, A_h)).
    values: (B, S, Dv) what the context is a weighted sum of (multi-head: (B, H, S, d)).
    mask: (B, S) bool, True = may attend, or None.

    Every field has the batch first, so beam search can expand it with ``repeat_interleave``.
    """

    keys: Tensor
    values: Tensor
    mask: Tensor | None


class AttentionOutput(NamedTuple):
    """context (B[, K], Dv); alpha (B[, K], S) the image/source weights (renormalised over the
    memory when an extra position takes part); beta (B[, K]) the extra position's weight, or None."""

    context: Tensor
    alpha: Tensor
    beta: Tensor | None = None


def attend_projected(scorer: Scorer, qp: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None,
                     extra: PreparedMemory | None = None, scratch: Tensor | None = None) -> AttentionOutput:
    """Scores -> masked softmax -> weighted sum, for every layer and path that builds a graph or
    decodes (the fused recurrence runs the same steps with hand-written gradients).

    Args:
        qp: (..., K, Q) projected queries; keys (..., S, A) prepared; values (..., S, Dv);
            mask broadcastable to (..., K, S), True = may attend.
        extra: one more position per query (the visual sentinel): keys (..., K, A), values
            (..., K, Dv). It joins the softmax at index S; ``alpha`` stays the softmax over the
            memory alone (sums to 1), ``beta`` is the extra position's joint weight, and the
            context is ``beta * value + (1 - beta) * alpha @ values``.
        scratch: from ``scorer.new_scratch``: no-graph scores through ``scores_into``.
    """
    s = keys.shape[-2]
    if scratch is not None and not torch.is_grad_enabled() and scorer.offers("scores_into"):
        lead, k = qp.shape[:-2], qp.shape[-2]
        e = scorer.scores_into(qp.reshape(-1, k, qp.shape[-1]), keys.reshape(-1, s, keys.shape[-1]), scratch)
        e = e.view(*lead, k, s)
    else:
        e = scorer.scores(qp, keys)  # (..., K, S)
    alpha = masked_softmax(e, mask)
    if extra is None:
        return AttentionOutput(torch.matmul(alpha.to(values.dtype), values), alpha)
    e_x = scorer.hook("scores_paired")(qp, extra.keys, s).to(e.dtype)  # (..., K)
    joint_mask = None
    if mask is not None:
        joint_mask = torch.cat([mask.expand_as(e), mask.new_ones(*e.shape[:-1], 1)], -1)
    w = masked_softmax(torch.cat([e, e_x.unsqueeze(-1)], -1), joint_mask)  # (..., K, S + 1)
    context = torch.matmul(w[..., :s].to(values.dtype), values) + w[..., s:] * extra.values
    return AttentionOutput(context, alpha, w[..., s])


class _Layer(nn.Module):
    """What both layers share: the attend path over (B, H, K, .) heads."""

    heads = 1
    scorer: Scorer

    def _project(self, query: Tensor) -> Tensor:  # (B, K, Dq) -> (B, K, Q) or (B, H, K, Q)
        raise NotImplementedError

    def _merge(self, context: Tensor) -> Tensor:  # (B, K, Dv) or (B, H, K, d) -> (B, K, out)
        raise NotImplementedError

    def attend(self, query: Tensor, memory: PreparedMemory, extra: PreparedMemory | None = None,
               scratch: Tensor | None = None) -> AttentionOutput:
        """Attend with one query per item (B, Dq) or K (B, K, Dq); ``extra`` (from ``prepare`` of
        (B, K, Dk) rows): one more position per query (see :func:`attend_projected`).
        Returns context (B[, K], out), alpha (B[, K], S), beta (B[, K]) or None; multi-head:
        alpha and beta averaged over heads."""
        single = query.dim() == 2
        q = query.unsqueeze(1) if single else query  # (B, K, Dq)
        mask = None if memory.mask is None else memory.mask[:, None, None, :] if self.heads > 1 \
            else memory.mask.unsqueeze(1)  # (B, [1,] 1, S)
        out = attend_projected(self.scorer, self._project(q), memory.keys, memory.values, mask, extra, scratch)
        context = self._merge(out.context)
        alpha, beta = out.alpha, out.beta
        if self.heads > 1:
            alpha, beta = alpha.mean(1), None if beta is None else beta.mean(1)
        if single:
            return AttentionOutput(context.squeeze(1), alpha.squeeze(1), None if beta is None else beta.squeeze(1))
        return AttentionOutput(context, alpha, beta)

    def forward(self, query: Tensor, memory: PreparedMemory) -> tuple[Tensor, Tensor]:
        """query (B, Dq) or (B, T, Dq) -> context (B[, T], out), alpha (B[, T], S)."""
        out = self.attend(query, memory)
        return out.context, out.alpha

    def new_scratch(self, memory: PreparedMemory, queries: int) -> Tensor | None:
        """The scorer's no-graph buffer for ``queries`` queries per item (None if it needs none)."""
        if not self.scorer.offers("scores_into"):
            return None
        keys = memory.keys
        return self.scorer.new_scratch(keys.shape[0] * self.heads, queries, keys)

    def fused_query_map(self) -> tuple[Tensor, Tensor | None] | None:
        """(W (H*Q, Dq), b or None): the layer's query input -> every head's projected query, one
        linear map the fused recurrence stacks with the decoder's other products on its state.
        None: the identity (a single head whose scorer uses the query as is)."""
        raise NotImplementedError

    def output_map(self) -> tuple[Tensor, Tensor | None] | None:
        """(W, b) applied to the heads' concatenated contexts, or None."""
        return None


class Attention(_Layer):
    """Single-head soft attention: scorer + masked softmax + weighted sum of values.

    Args:
        query_dim: size of the query (decoder state).
        key_dim: size of each memory vector (image feature / encoder state).
        attention_dim: hidden size of the additive scorer (ignored by the others).
        score: one of :data:`SCORERS` (aliases: bahdanau, concat, cosine, luong).
        max_positions: only for ``location``: the largest S.
    """

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int = 512, score: str = "additive",
                 max_positions: int | None = None) -> None:
        super().__init__()
        self.score_name = SCORE_ALIASES.get(score, score)
        self.query_dim, self.key_dim, self.value_dim = query_dim, key_dim, key_dim
        self.scorer = _make_scorer(score, query_dim, key_dim, attention_dim, max_positions)

    def prepare(self, keys: Tensor, values: Tensor | None = None, mask: Tensor | None = None) -> PreparedMemory:
        """Project the memory once.  keys (B, S, Dk); values (B, S, Dv) default keys; mask (B, S)."""
        return PreparedMemory(self.scorer.prepare_keys(keys), keys if values is None else values, mask)

    def _project(self, query: Tensor) -> Tensor:
        return self.scorer.project_query(query)

    def _merge(self, context: Tensor) -> Tensor:
        return context

    def fused_query_map(self) -> tuple[Tensor, Tensor | None] | None:
        return self.scorer.query_map()


class MultiHeadAttention(_Layer):
    """Multi-head attention: per-head projections of query/keys/values, any scorer per head.

    With ``score='scaled_dot'`` this is exactly ``torch.nn.MultiheadAttention`` (same
    parameter layout via :meth:`load_from_torch`). ``alpha`` is averaged over heads.

    Args:
        query_dim, key_dim: input sizes; value_dim defaults to key_dim.
        num_heads: H; ``model_dim`` (default query_dim) must divide by H.
        out_dim: output size of the context (default model_dim).
    """

    def __init__(self, query_dim: int, key_dim: int, num_heads: int = 8, score: str = "scaled_dot",
                 model_dim: int | None = None, value_dim: int | None = None, out_dim: int | None = None,
                 attention_dim: int | None = None, max_positions: int | None = None, bias: bool = True) -> None:
        super().__init__()
        model_dim = model_dim or query_dim
        if model_dim % num_heads:
            raise ValueError(f"model_dim {model_dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, model_dim // num_heads
        self.heads = num_heads
        self.query_dim, self.key_dim = query_dim, key_dim
        self.value_dim = out_dim or model_dim
        self.score_name = SCORE_ALIASES.get(score, score)
        self.q_proj = nn.Linear(query_dim, model_dim, bias=bias)
        # Location scores ignore keys, so that variant has no key projection to train.
        self.k_proj = None if self.score_name == "location" else nn.Linear(key_dim, model_dim, bias=bias)
        self.v_proj = nn.Linear(value_dim or key_dim, model_dim, bias=bias)
        self.out_proj = nn.Linear(model_dim, self.value_dim, bias=bias)
        self.scorer = _make_scorer(score, self.head_dim, self.head_dim, attention_dim or self.head_dim, max_positions)

    def _split(self, x: Tensor) -> Tensor:  # (B, L, H*d) -> (B, H, L, d)
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

    def prepare(self, keys: Tensor, values: Tensor | None = None, mask: Tensor | None = None) -> PreparedMemory:
        """keys (B, S, Dk), values (B, S, Dv), mask (B, S) -> per-head memory (B, H, S, .)."""
        if self.k_proj is None:  # location: only the number of positions matters
            k = keys.new_zeros(keys.shape[0], self.num_heads, keys.shape[1], 0)
        else:
            k = self._split(self.k_proj(keys))
        v = self._split(self.v_proj(keys if values is None else values))
        return PreparedMemory(self.scorer.prepare_keys(k), v, mask)

    def _project(self, query: Tensor) -> Tensor:  # (B, K, Dq) -> (B, H, K, Q)
        return self.scorer.project_query(self._split(self.q_proj(query)))

    def _merge(self, context: Tensor) -> Tensor:  # (B, H, K, d) -> (B, K, out)
        b, _, k, _ = context.shape
        return self.out_proj(context.transpose(1, 2).reshape(b, k, -1))

    def fused_query_map(self) -> tuple[Tensor, Tensor | None]:
        w, b = self.q_proj.weight, self.q_proj.bias  # (H*d, Dq), (H*d,)
        qm = self.scorer.query_map()
        if qm is None:
            return w, b
        ws, bs = qm  # (Q, d), (Q,) or None: the same map for every head
        h, d = self.num_heads, self.head_dim
        weight = torch.matmul(ws, w.view(h, d, -1)).reshape(-1, w.shape[-1])  # (H*Q, Dq)
        bias = None if b is None else torch.matmul(b.view(h, d), ws.t())  # (H, Q)
        if bs is not None:
            bias = bs.expand(h, -1) if bias is None else bias + bs
        return weight, None if bias is None else bias.reshape(-1)

    def output_map(self) -> tuple[Tensor, Tensor | None]:
        return self.out_proj.weight, self.out_proj.bias

    @torch.no_grad()
    def load_from_torch(self, mha: nn.MultiheadAttention) -> None:
        """Copy weights from a ``torch.nn.MultiheadAttention`` (packed in_proj) into this layer."""
        d = self.q_proj.out_features
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight
            self.q_proj.weight.copy_(w[:d]); self.k_proj.weight.copy_(w[d:2 * d]); self.v_proj.weight.copy_(w[2 * d:])
        else:
            self.q_proj.weight.copy_(mha.q_proj_weight); self.k_proj.weight.copy_(mha.k_proj_weight)
            self.v_proj.weight.copy_(mha.v_proj_weight)
        if mha.in_proj_bias is not None:
            b = mha.in_proj_bias
            self.q_proj.bias.copy_(b[:d]); self.k_proj.bias.copy_(b[d:2 * d]); self.v_proj.bias.copy_(b[2 * d:])
        self.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            self.out_proj.bias.copy_(mha.out_proj.bias)


def build_attention(score: str, query_dim: int, key_dim: int, attention_dim: int = 512, num_heads: int = 1,
                    max_positions: int | None = None) -> Attention | MultiHeadAttention | None:
    """The factory both decoders use. ``score='none'`` returns None (fixed-context baseline).

    ``num_heads > 1`` gives :class:`MultiHeadAttention` with ``model_dim=attention_dim`` and a
    context of size ``key_dim`` (so the decoder's input size does not depend on the heads).
    """
    if score is None or score == "none":
        return None
    if num_heads > 1:
        return MultiHeadAttention(query_dim, key_dim, num_heads=num_heads, score=score, model_dim=attention_dim,
                                  out_dim=key_dim, max_positions=max_positions)
    return Attention(query_dim, key_dim, attention_dim=attention_dim, score=score, max_positions=max_positions)
