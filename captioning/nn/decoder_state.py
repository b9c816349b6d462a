"""What the attention-LSTM decoders pass around: the query style names, the decoder's outputs,
its memory (what stays fixed across steps) and its state (what each step changes), and the
stacking of every linear map applied to the state into one matrix (one GEMM a step).

Where the decoder looks (``query``; the text names are aliases):

``previous`` (Xu et al. 2015; Bahdanau et al. 2015, alias ``bahdanau``): attend with h_{t-1},
then the LSTM step with the context as input::

    context_t, alpha_t = attention(h_{t-1}, memory)
    h_t, c_t = LSTM([embed(y_{t-1}); context_t], (h_{t-1}, c_{t-1}))

``current`` (Luong et al. 2015 with input feeding, alias ``luong``): the LSTM step with the
previous attentional vector as input, then attend with h_t::

    h_t, c_t = LSTM([embed(y_{t-1}); h~_{t-1}], (h_{t-1}, c_{t-1}))
    context_t, alpha_t = attention(h_t, memory);  h~_t = tanh(W_c [h_t; context_t])

``sentinel=True`` (Lu et al. 2017): a fifth LSTM gate g_t gives s_t = sigmoid(g_t) * tanh(c_t)
(what the decoder already knows), projected to the memory width and attended as one more
position by the same score (``location`` gets one more position). beta_t is its weight:
context_t = beta_t s + (1 - beta_t) sum_i alpha_ti v_i. ``previous`` attends with the sentinel
of the previous step (s_0 = tanh(W mean)), ``current`` with that of the step itself.
``alphas`` are the memory weights renormalised over the memory (rows sum to 1: what the
overlays draw); ``betas`` carry beta_t.

Shared by :mod:`captioning.nn.decoder_core`, both decoders, search and the models.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from captioning.nn.attention import PreparedMemory
from captioning.nn.recurrence import QUERY_STYLES

QUERY_ALIASES = {"bahdanau": "previous", "luong": "current"}


def canonical_query(query: str) -> str:
    """``previous`` / ``current`` (the text model's ``bahdanau`` / ``luong`` are aliases)."""
    name = QUERY_ALIASES.get(query, query)
    if name not in QUERY_STYLES:
        raise ValueError(f"query must be one of {QUERY_STYLES + tuple(QUERY_ALIASES)}, got {query!r}")
    return name


class DecoderOutput(NamedTuple):
    """logits (B, T, V); alphas (B, T, S) attention of every step; betas (B, T) the sentinel's
    weight of every step, or None without a sentinel."""

    logits: Tensor
    alphas: Tensor
    betas: Tensor | None = None


class DecoderMemory(NamedTuple):
    """What does not change across steps. attn: the layer's prepared memory (None without
    attention); summary (B, C): the vector that seeds the state (and is the context without
    attention); mask (B, S) True = a real position, or None; num_positions: S; group:
    hypotheses per item after :meth:`AttentionDecoderCore.expand_memory` (they attend
    together); scratch: the scorer's no-graph buffer (search only)."""

    attn: PreparedMemory | None
    summary: Tensor
    mask: Tensor | None
    num_positions: int
    group: int = 1
    scratch: Tensor | None = None


class DecoderState(NamedTuple):
    """h, c (N, D) the LSTM state; sentinel (N, D) s_{t-1} (``previous`` with a sentinel);
    feed (N, D) the previous attentional vector (``current``)."""

    h: Tensor
    c: Tensor
    sentinel: Tensor | None = None
    feed: Tensor | None = None


def stack_state_maps(maps: list[tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
    """Every linear map applied to the state, (weight (R_i, D), bias (R_i,) or None) in row
    order -> the stacked weight (R, D) and bias (R,) (zeros where a map has none) or None."""
    w_h = torch.cat([w for w, _ in maps], 0)
    if all(b is None for _, b in maps):
        return w_h, None
    return w_h, torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in maps])
