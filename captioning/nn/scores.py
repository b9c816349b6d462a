"""The score functions of the attention layer; every score owns all of its maths.

A score function is a :class:`Scorer`. Its maths, all in its own class:

* ``prepare_keys(keys (..., S, Dk)) -> (..., S, A)``: query-independent work, once per memory;
* ``query_map() -> (W (Q, Dq), b (Q,) | None) | None``: the linear first stage applied to the
  query (None: the query is used as is); ``project_query`` applies it;
* ``scores(qp (..., K, Q), prepared (..., S, A)) -> (..., K, S)``: the score of projected queries,
  plain autograd maths. ``score(query, prepared)`` = ``scores(project_query(query), prepared)``.

and its fast-path hooks (see docs/attention.md), which the fused training recurrence
(:mod:`captioning.nn.recurrence`) and search (through :meth:`Attention.attend`) call, so no
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
hooks next to its maths (tests/nn/test_scores.py shows both).

Adding a score: a subclass here plus its line in :data:`SCORERS` (docs/attention.md walks
through one). :mod:`captioning.nn.attention` puts any scorer behind the one masked softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioning.nn import kernels
from captioning.nn.scorer import ScoreBackward, Scorer, steps_stacked

__all__ = ["SCORERS", "SCORE_ALIASES", "ScoreBackward", "Scorer", "compares_directly", "make_scorer"]

# Size of an additive scorer's scratch (elements): 8 MB in float32, fits the last-level cache;
# larger chunks fall out of it, smaller ones mean more (parallel) ops per step.
SCRATCH_ELEMENTS = 1 << 21


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
            return torch.bmm(d_scores, self.keys[: qp.shape[0]]) * self.scale  # (n, 1, S) @ (n, S, Q)

        @torch.no_grad()
        def finish(self) -> tuple[Tensor, tuple[Tensor | None, ...]]:
            items = self.keys.shape[0]
            d_s, q = steps_stacked(self.d_scores, items), steps_stacked(self.queries, items)  # (N, T, S), (N, T, Q)
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
        def step(self, d_scores: Tensor, qp: Tensor) -> Tensor:  # (n, 1, S), (n, 1, A): the first n items
            items, chunk, a = qp.shape[0], self.buf.shape[0], self.keys2.shape[-1]  # the first `items` of N
            d_v_rows, d_q = d_scores.new_empty(items, 1, a), d_scores.new_empty(items, 1, a)
            for i in range(0, items, chunk):
                j = min(i + chunk, items)
                d_e = d_scores[i:j]
                sig = torch.add(self.keys2[i:j], qp[i:j], alpha=2, out=self.buf[: j - i]).sigmoid_()
                torch.bmm(d_e, sig, out=d_v_rows[i:j])
                sig_grad = sig.addcmul_(sig, sig, value=-1)  # sig - sig^2, in place
                torch.bmm(d_e, sig_grad, out=d_q[i:j])
                self.d_pre[i:j].addcmul_(sig_grad, d_e.transpose(1, 2), value=4)
            self.d_v += 2 * d_v_rows.sum((0, 1)) - d_scores.sum()
            return 4 * self.v * d_q

        def finish(self) -> tuple[Tensor, tuple[Tensor | None, ...]]:
            return self.d_pre.mul_(self.v), (self.d_v.view(1, -1),)

    class KernelBackward:
        """:class:`Backward` as one fused kernel per step (captioning.nn.kernels.additive; CUDA):
        the same sums, without the chunked (n, S, A) scratch."""

        def __init__(self, prepared: Tensor, v: Tensor) -> None:
            self.keys = prepared.detach().contiguous()
            self.v = v.detach().to(prepared.dtype).contiguous()
            self.d_pre = torch.zeros_like(self.keys)
            self.d_v_rows = self.keys.new_zeros(self.keys.shape[0], self.keys.shape[-1])
            self.d_sums = self.keys.new_zeros(self.keys.shape[0])

        @torch.no_grad()
        def step(self, d_scores: Tensor, qp: Tensor) -> Tensor:  # (n, 1, S), (n, 1, A): the first n items
            from captioning.nn.kernels.additive import backward_step

            n = qp.shape[0]
            d_qp = qp.new_empty(n, 1, qp.shape[-1], dtype=self.keys.dtype)
            backward_step(
                d_scores.reshape(n, -1).contiguous(),
                qp.reshape(n, -1).contiguous(),
                self.keys,
                self.v,
                self.d_pre,
                self.d_v_rows,
                self.d_sums,
                d_qp.view(n, -1),
            )
            return d_qp

        def finish(self) -> tuple[Tensor, tuple[Tensor | None, ...]]:
            d_v = 2 * self.d_v_rows.sum(0) - self.d_sums.sum()
            return self.d_pre.mul_(self.v), (d_v.view(1, -1),)

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
        if kernels.usable(qp):  # one fused kernel, no scratch (GPU)
            from captioning.nn.kernels.additive import scores as fused

            dtype = torch.promote_types(prepared.dtype, torch.float32)
            out = qp.new_empty(*qp.shape[:2], prepared.shape[1], dtype=dtype)
            return fused(qp.contiguous(), prepared.contiguous(), self.v.weight.view(-1), out)
        if scratch is None:
            scratch = self.new_scratch(qp.shape[0], qp.shape[1], prepared)
        q2 = 2 * qp.unsqueeze(2)  # (N, K, 1, A)
        v = self.v.weight.view(-1)
        v2 = 2 * v.to(scratch.dtype)
        b, n = q2.shape[0], scratch.shape[0]
        scores = q2.new_empty(b, q2.shape[1], prepared.shape[1], dtype=scratch.dtype)  # (N, K, S)
        for i in range(0, b, n):
            m = min(n, b - i)
            sig = torch.add(q2[i : i + m], prepared[i : i + m].unsqueeze(1), alpha=2, out=scratch[:m]).sigmoid_()
            torch.matmul(sig, v2, out=scores[i : i + m])  # 2 sigmoid(2q + 2K) @ v
        return scores.to(torch.promote_types(scores.dtype, torch.float32)).sub_(v.sum())  # >= fp32

    def score_backward(self, prepared: Tensor) -> ScoreBackward:
        if kernels.usable(prepared):
            return AdditiveScorer.KernelBackward(prepared, self.v.weight.view(-1))
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
            keys = self.keys[: qp.shape[0]]  # the first n items
            cos = torch.bmm(unit, keys.transpose(1, 2))  # (n, 1, S)
            self.d_raw += (d_scores * cos).sum()
            self.d_scores.append(d_scores)
            self.units.append(unit)
            d_unit = self.beta * torch.bmm(d_scores, keys)  # (n, 1, Q)
            # normalize: x / max(|x|, eps): (I - u u^T) / |x| above eps, I / eps below it.
            radial = (d_unit - unit * (unit * d_unit).sum(-1, keepdim=True)) / norm.clamp_min(ContentScorer.eps)
            return torch.where(norm >= ContentScorer.eps, radial, d_unit / ContentScorer.eps)

        @torch.no_grad()
        def finish(self) -> tuple[Tensor, tuple[Tensor | None, ...]]:
            items = self.keys.shape[0]
            d_s, u = steps_stacked(self.d_scores, items), steps_stacked(self.units, items)
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

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        attention_dim: int | None = None,
        max_positions: int | None = None,
        **_: object,
    ) -> None:
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
            raise ValueError(
                f"score 'location' has max_positions={self.max_positions}, too few for an extra "
                f"position {position} (a sentinel needs the grid size + 1)"
            )
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


def make_scorer(score: str, query_dim: int, key_dim: int, attention_dim: int, max_positions: int | None) -> Scorer:
    name = SCORE_ALIASES.get(score, score)
    if name not in SCORERS:
        raise ValueError(f"unknown attention score {score!r}; choose one of {sorted(SCORERS)} or 'none'")
    return SCORERS[name](query_dim, key_dim, attention_dim, max_positions=max_positions)
