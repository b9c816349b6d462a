"""One attention layer for images and text, over any score function of :mod:`captioning.nn.scores`.

A score function is a :class:`~captioning.nn.scores.Scorer` that owns all of its maths (the plain
score, its no-graph forward and backward hooks); the fused training recurrence
(:mod:`captioning.nn.recurrence`) and search (through :meth:`Attention.attend`) call those
hooks, so no score formula is written anywhere else (docs/attention.md).

:class:`Attention` puts a scorer behind the one masked-softmax-and-context path
(:func:`attend_projected`); :class:`MultiHeadAttention` adds per-head projections around any
scorer. Both are stateless: ``prepare`` returns the projected keys (a :class:`PreparedMemory`).

Mask convention (everywhere in this package): boolean, ``True`` = may attend. Masked
positions get exactly 0 weight; a fully masked row gets all zeros (and a zero context),
never NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from captioning.nn.scores import SCORE_ALIASES, SCORERS, ScoreBackward, Scorer, compares_directly, make_scorer

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
    "compares_directly",
    "masked_softmax",
    "softmax_backward",
]


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


def attend_projected(
    scorer: Scorer,
    qp: Tensor,
    keys: Tensor,
    values: Tensor,
    mask: Tensor | None,
    extra: PreparedMemory | None = None,
    scratch: Tensor | None = None,
) -> AttentionOutput:
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

    def attend(
        self, query: Tensor, memory: PreparedMemory, extra: PreparedMemory | None = None, scratch: Tensor | None = None
    ) -> AttentionOutput:
        """Attend with one query per item (B, Dq) or K (B, K, Dq); ``extra`` (from ``prepare`` of
        (B, K, Dk) rows): one more position per query (see :func:`attend_projected`).
        Returns context (B[, K], out), alpha (B[, K], S), beta (B[, K]) or None; multi-head:
        alpha and beta averaged over heads."""
        single = query.dim() == 2
        q = query.unsqueeze(1) if single else query  # (B, K, Dq)
        mask = (
            None
            if memory.mask is None
            else memory.mask[:, None, None, :]
            if self.heads > 1
            else memory.mask.unsqueeze(1)
        )  # (B, [1,] 1, S)
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

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        attention_dim: int = 512,
        score: str = "additive",
        max_positions: int | None = None,
    ) -> None:
        super().__init__()
        self.score_name = SCORE_ALIASES.get(score, score)
        self.query_dim, self.key_dim, self.value_dim = query_dim, key_dim, key_dim
        self.scorer = make_scorer(score, query_dim, key_dim, attention_dim, max_positions)

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

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        num_heads: int = 8,
        score: str = "scaled_dot",
        model_dim: int | None = None,
        value_dim: int | None = None,
        out_dim: int | None = None,
        attention_dim: int | None = None,
        max_positions: int | None = None,
        bias: bool = True,
    ) -> None:
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
        self.scorer = make_scorer(score, self.head_dim, self.head_dim, attention_dim or self.head_dim, max_positions)

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
        if self.k_proj is None:
            raise ValueError("a location score has no key projection to load")
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight
            self.q_proj.weight.copy_(w[:d])
            self.k_proj.weight.copy_(w[d : 2 * d])
            self.v_proj.weight.copy_(w[2 * d :])
        else:
            self.q_proj.weight.copy_(mha.q_proj_weight)
            self.k_proj.weight.copy_(mha.k_proj_weight)
            self.v_proj.weight.copy_(mha.v_proj_weight)
        if mha.in_proj_bias is not None:
            b = mha.in_proj_bias
            self.q_proj.bias.copy_(b[:d])
            self.k_proj.bias.copy_(b[d : 2 * d])
            self.v_proj.bias.copy_(b[2 * d :])
        self.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            self.out_proj.bias.copy_(mha.out_proj.bias)


def build_attention(
    score: str,
    query_dim: int,
    key_dim: int,
    attention_dim: int = 512,
    num_heads: int = 1,
    max_positions: int | None = None,
) -> Attention | MultiHeadAttention | None:
    """The factory both decoders use. ``score='none'`` returns None (fixed-context baseline).

    ``num_heads > 1`` gives :class:`MultiHeadAttention` with ``model_dim=attention_dim`` and a
    context of size ``key_dim`` (so the decoder's input size does not depend on the heads).
    """
    if score is None or score == "none":
        return None
    if num_heads > 1:
        return MultiHeadAttention(
            query_dim,
            key_dim,
            num_heads=num_heads,
            score=score,
            model_dim=attention_dim,
            out_dim=key_dim,
            max_positions=max_positions,
        )
    return Attention(query_dim, key_dim, attention_dim=attention_dim, score=score, max_positions=max_positions)
