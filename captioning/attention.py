"""One attention layer for images and text.

Every score function is a small module with two methods:

* ``prepare_keys(keys (B, S, Dk)) -> (B, S, A)``: the query-independent work (key
  projections), done once per image or source sentence;
* ``score(query (B, T, Dq), prepared (B, S, A)) -> (B, T, S)``: the per-step work.

:class:`Attention` puts a scorer behind the one masked-softmax-and-context path;
:class:`MultiHeadAttention` adds per-head projections around any scorer. Both are
stateless: ``prepare`` returns the projected keys (a :class:`PreparedMemory`) instead of
storing them, so beam search, DDP and ``torch.compile`` see no hidden state.

Mask convention (everywhere in this package): boolean, ``True`` = may attend. Masked
positions get exactly 0 weight; a fully masked row gets all zeros (and a zero context),
never NaN.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SCORERS",
    "Attention",
    "MultiHeadAttention",
    "PreparedMemory",
    "build_attention",
    "masked_softmax",
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


# --------------------------------------------------------------------------- scorers
class DotScorer(nn.Module):
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

    def prepare_keys(self, keys: Tensor) -> Tensor:  # (B, S, D) -> (B, S, D)
        return keys

    def score(self, query: Tensor, prepared: Tensor) -> Tensor:
        # (B, T, D) @ (B, D, S) -> (B, T, S)
        return torch.matmul(query, prepared.transpose(-1, -2)) * self.scale


class ScaledDotScorer(DotScorer):
    """Vaswani et al.: ``q . k / sqrt(d)``."""

    scale_by_dim = True


class GeneralScorer(nn.Module):
    """Luong "general": ``q^T W k``; ``W k`` is computed once per sequence."""

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int | None = None, **_: object) -> None:
        super().__init__()
        self.key_proj = nn.Linear(key_dim, query_dim, bias=False)

    def prepare_keys(self, keys: Tensor) -> Tensor:  # (B, S, Dk) -> (B, S, Dq)
        return self.key_proj(keys)

    def score(self, query: Tensor, prepared: Tensor) -> Tensor:  # -> (B, T, S)
        return torch.matmul(query, prepared.transpose(-1, -2))


class AdditiveScorer(nn.Module):
    """Bahdanau "concat": ``v^T tanh(W1 q + W2 k)``; ``W2 k`` is computed once per sequence."""

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int, **_: object) -> None:
        super().__init__()
        self.key_proj = nn.Linear(key_dim, attention_dim)
        self.query_proj = nn.Linear(query_dim, attention_dim, bias=False)
        self.v = nn.Linear(attention_dim, 1, bias=False)

    def prepare_keys(self, keys: Tensor) -> Tensor:  # (B, S, Dk) -> (B, S, A)
        return self.key_proj(keys)

    def score(self, query: Tensor, prepared: Tensor) -> Tensor:
        q = self.query_proj(query)  # (..., T, A)
        # tanh(x) = 2 sigmoid(2x) - 1, with the affine part folded into v: the same function,
        # but this (..., T, S, A) tensor is the largest of a decoding step and PyTorch's CPU
        # sigmoid is ~6x faster than its tanh. Scores differ from torch.tanh's by rounding only.
        sig = torch.sigmoid(torch.add(2 * q.unsqueeze(-2), prepared.unsqueeze(-3), alpha=2))  # (..., T, S, A)
        return 2 * self.v(sig).squeeze(-1) - self.v.weight.sum()  # (..., T, S)


class ContentScorer(nn.Module):
    """Graves "content-based": ``beta * cosine(W q, k)``.

    The query is projected to the key size when the two differ; ``beta`` (a learned
    sharpness, kept positive through softplus) lets the weights become peaked, since
    cosine alone lies in [-1, 1].
    """

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int | None = None, **_: object) -> None:
        super().__init__()
        self.query_proj = nn.Linear(query_dim, key_dim, bias=False) if query_dim != key_dim else nn.Identity()
        self.raw_beta = nn.Parameter(torch.tensor(math.log(math.expm1(5.0))))

    def prepare_keys(self, keys: Tensor) -> Tensor:  # (B, S, Dk), unit length
        return F.normalize(keys, dim=-1, eps=1e-6)

    def score(self, query: Tensor, prepared: Tensor) -> Tensor:
        q = F.normalize(self.query_proj(query), dim=-1, eps=1e-6)  # (B, T, Dk)
        return F.softplus(self.raw_beta) * torch.matmul(q, prepared.transpose(-1, -2))


class LocationScorer(nn.Module):
    """Luong "location": ``W q`` gives one score per source position; keys are ignored.

    Needs ``max_positions`` >= the longest source (for images: the grid size H*W).
    """

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

    def score(self, query: Tensor, prepared: Tensor) -> Tensor:
        return self.proj(query)[..., : prepared.shape[-2]]  # (..., T, S)


SCORERS: dict[str, type[nn.Module]] = {
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


def _make_scorer(score: str, query_dim: int, key_dim: int, attention_dim: int, max_positions: int | None) -> nn.Module:
    name = SCORE_ALIASES.get(score, score)
    if name not in SCORERS:
        raise ValueError(f"unknown attention score {score!r}; choose one of {sorted(SCORERS)} or 'none'")
    return SCORERS[name](query_dim, key_dim, attention_dim, max_positions=max_positions)


# --------------------------------------------------------------------------- layers
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


class Attention(nn.Module):
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

    def forward(self, query: Tensor, memory: PreparedMemory) -> tuple[Tensor, Tensor]:
        """Attend with one query per item (B, Dq) or several (B, T, Dq).

        Returns:
            context: (B, Dv) or (B, T, Dv).
            alpha: (B, S) or (B, T, S) attention weights.
        """
        single = query.dim() == 2
        q = query.unsqueeze(1) if single else query  # (B, T, Dq)
        scores = self.scorer.score(q, memory.keys)  # (B, T, S)
        mask = None if memory.mask is None else memory.mask.unsqueeze(1)  # (B, 1, S)
        alpha = masked_softmax(scores, mask)
        context = torch.bmm(alpha, memory.values)  # (B, T, Dv)
        return (context.squeeze(1), alpha.squeeze(1)) if single else (context, alpha)


class MultiHeadAttention(nn.Module):
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

    def forward(self, query: Tensor, memory: PreparedMemory) -> tuple[Tensor, Tensor]:
        """query (B, Dq) or (B, T, Dq) -> context (B[, T], out_dim), alpha (B[, T], S) (mean over heads)."""
        single = query.dim() == 2
        q = query.unsqueeze(1) if single else query
        b, t, _ = q.shape
        qh = self._split(self.q_proj(q))  # (B, H, T, d)
        scores = self.scorer.score(qh, memory.keys)  # (B, H, T, S)
        mask = None if memory.mask is None else memory.mask[:, None, None, :]  # (B, 1, 1, S)
        alpha = masked_softmax(scores, mask)  # (B, H, T, S)
        ctx = torch.matmul(alpha, memory.values)  # (B, H, T, d)
        context = self.out_proj(ctx.transpose(1, 2).reshape(b, t, -1))  # (B, T, out)
        alpha = alpha.mean(1)  # (B, T, S)
        return (context.squeeze(1), alpha.squeeze(1)) if single else (context, alpha)

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
