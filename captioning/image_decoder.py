"""The Show, Attend and Tell decoder: an LSTM that attends over the image grid for every word.

Where it looks is a configuration choice (``query``):

``previous`` (Xu et al. 2015, the default): attend with h_{t-1} before the LSTM step::

    context_t, alpha_t = attention(h_{t-1}, features)           # soft attention over S cells
    context_t = sigmoid(f_beta(h_{t-1})) * context_t            # gating scalar (per channel)
    h_t, c_t = LSTM([embed(y_{t-1}); context_t], (h_{t-1}, c_{t-1}))
    p(y_t) = softmax(W_out dropout(h_t))

``current`` (Luong et al. 2015, with input feeding): attend after the LSTM step with h_t::

    h_t, c_t = LSTM([embed(y_{t-1}); h~_{t-1}], (h_{t-1}, c_{t-1}))
    context_t, alpha_t = attention(h_t, features);  context_t = sigmoid(f_beta(h_t)) * context_t
    h~_t = tanh(W_c [h_t; context_t]);  p(y_t) = softmax(W_out dropout(h~_t))

``sentinel=True`` (Lu et al. 2017, "Knowing When to Look"): an extra LSTM gate g_t gives a
visual sentinel s_t = sigmoid(g_t) * tanh(c_t) (what the decoder already knows), projected to
the feature size and joined to the attended set as one more position (scored by the same
score function; ``location`` gets one more position). beta_t is its weight:
context_t = beta_t s_t + (1 - beta_t) sum_i alpha_ti v_i. With ``previous`` the step attends
with the sentinel of the previous step (s_0 = tanh(init_sentinel(mean feature))); with
``current`` with that of the step itself. ``alphas`` are the image weights renormalised over
the image (each row sums to 1: what the overlays draw and the doubly stochastic regulariser
sees); ``betas`` carry beta_t.

Teacher forcing is written for speed: the embedding half of the LSTM input projection and
the output projection are one matrix product over all steps; the key projection is prepared
once per image; the loop is :func:`captioning.sat_recurrence.fused_recurrence` (every product on
the state in one GEMM, a hand-written backward that forms each weight gradient once over all
steps) for every score, head count, query style and the sentinel; ``fused=False`` runs the
plain autograd loop, the reference the tests compare against.

The step interface (``prepare_memory`` / ``init_state`` / ``step`` / ``expand_memory``,
:class:`captioning.search.StepDecoder`) is what :mod:`captioning.search` drives; the text
seq2seq decoder implements the same one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from captioning.attention import PreparedMemory, build_attention, compares_directly
from captioning.sat_recurrence import (QUERY_STYLES, RecurrenceOutput, RecurrencePlan, autocast_matmul_dtype,
                                       fused_recurrence, lstm_cell, plain_steps, stack_state_maps)
from captioning.search import StepOutput


class DecoderOutput(NamedTuple):
    """logits (B, T, V); alphas (B, T, S) attention of every step; betas (B, T) the sentinel's
    weight of every step, or None without a sentinel."""

    logits: Tensor
    alphas: Tensor
    betas: Tensor | None = None


class SATMemory(NamedTuple):
    """What does not change across steps. attn: the layer's prepared memory (None without
    attention); mean (B, C) mean feature; num_positions S; group: hypotheses per item after
    :meth:`ShowAttendTellDecoder.expand_memory` (they attend together); scratch: the scorer's
    no-graph buffer (search only)."""

    attn: PreparedMemory | None
    mean: Tensor
    num_positions: int
    group: int = 1
    scratch: Tensor | None = None


class SATState(NamedTuple):
    """h, c (N, D) the LSTM state; sentinel (N, D) s_{t-1} (``previous`` with a sentinel);
    feed (N, D) the previous attentional vector (``current``)."""

    h: Tensor
    c: Tensor
    sentinel: Tensor | None = None
    feed: Tensor | None = None


class ShowAttendTellDecoder(nn.Module):
    """LSTM decoder with soft attention over a grid of image features.

    Args:
        vocab_size: V.
        encoder_dim: C, channels of each grid cell.
        embed_dim, decoder_dim, attention_dim: E, D, A.
        attention: score function name (see :data:`captioning.attention.SCORERS`) or ``"none"``
            (no attention: the mean feature is a fixed context at every step, the baseline).
        num_heads: > 1 for multi-head attention.
        gate: use the gating scalar beta_t (f_beta).
        dropout: before the output projection.
        max_positions: S, needed by the ``location`` score (grid H*W).
        fused: teacher forcing through the fused recurrence (same outputs and gradients as the
            plain loop, faster); False forces the plain loop.
        query: ``"previous"`` or ``"current"`` (module docstring).
        sentinel: adaptive attention with a visual sentinel (module docstring).
    """

    def __init__(self, vocab_size: int, encoder_dim: int, embed_dim: int = 512, decoder_dim: int = 512,
                 attention_dim: int = 512, attention: str = "additive", num_heads: int = 1, gate: bool = True,
                 dropout: float = 0.5, max_positions: int | None = None, fused: bool = True,
                 query: str = "previous", sentinel: bool = False) -> None:
        super().__init__()
        if query not in QUERY_STYLES:
            raise ValueError(f"query must be one of {QUERY_STYLES}, got {query!r}")
        if sentinel and (attention is None or attention == "none"):
            raise ValueError("sentinel=True needs an attention score (the sentinel joins the attended set)")
        self.fused, self.query, self.sentinel = fused, query, sentinel
        self.vocab_size, self.encoder_dim, self.decoder_dim = vocab_size, encoder_dim, decoder_dim
        self.attention_name = attention
        # Dot-product scores compare the query with the keys directly, so they need the same
        # size: when the LSTM state is not C wide, the decoder projects its query (the layer
        # itself stays strict about it).
        needs_same_size = compares_directly(attention, num_heads) and decoder_dim != encoder_dim
        self.query_proj = nn.Linear(decoder_dim, encoder_dim, bias=False) if needs_same_size else None
        query_dim = encoder_dim if needs_same_size else decoder_dim
        positions = max_positions + 1 if sentinel and max_positions else max_positions  # + the sentinel
        self.attention = build_attention(attention, query_dim, encoder_dim, attention_dim, num_heads, positions)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.gate = nn.Linear(decoder_dim, encoder_dim) if gate and self.attention is not None else None
        # LSTM cell with its input projection split by input: embedding / context (or the fed-back
        # vector) / state; a fifth gate block makes the sentinel.
        gates = (5 if sentinel else 4) * decoder_dim
        self.input_embed = nn.Linear(embed_dim, gates)  # carries the LSTM bias
        if query == "previous":
            self.input_context = nn.Linear(encoder_dim, gates, bias=False)
        self.recurrent = nn.Linear(decoder_dim, gates, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(decoder_dim, vocab_size)
        # Modules of the other variants come last, so the default one is built (and seeded) as before.
        if query == "current":
            self.input_feed = nn.Linear(decoder_dim, gates, bias=False)
            self.combine = nn.Linear(decoder_dim + encoder_dim, decoder_dim)
        if sentinel:
            self.sentinel_proj = nn.Linear(decoder_dim, encoder_dim, bias=False)
            if query == "previous":
                self.init_sentinel = nn.Linear(encoder_dim, decoder_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.output.bias)
        nn.init.uniform_(self.output.weight, -0.1, 0.1)
        with torch.no_grad():  # forget-gate bias 1: remember by default early in training
            self.input_embed.bias.zero_()
            self.input_embed.bias[self.decoder_dim: 2 * self.decoder_dim] = 1.0

    # ------------------------------------------------------------------ step interface
    def prepare_memory(self, features: Tensor, mask: Tensor | None = None) -> SATMemory:
        """Everything that does not change across steps. features (B, S, C); mask (B, S) bool."""
        if mask is None:
            mean = features.mean(1)
        else:
            m = mask.unsqueeze(-1).to(features.dtype)
            mean = (features * m).sum(1) / m.sum(1).clamp(min=1)
        attn = self.attention.prepare(features, features, mask) if self.attention is not None else None
        return SATMemory(attn, mean, features.shape[1])

    def expand_memory(self, memory: SATMemory, beam_size: int) -> SATMemory:
        """Memory for ``beam_size`` hypotheses per item (beam search), WITHOUT copying the grid:
        the step then attends with the K queries of an item at once, so each step reads the
        (B, S, C) features once instead of K times. Only ``mean`` (B, C), which seeds the
        initial state, is repeated to (B*K, C). Greedy search calls it with ``beam_size=1``.
        """
        out = memory
        if beam_size > 1:
            out = out._replace(mean=memory.mean.repeat_interleave(beam_size, 0), group=beam_size)
        attn = memory.attn
        if attn is None or torch.is_grad_enabled() or not self.attention.scorer.offers("scores_into"):
            return out
        device = attn.keys.device.type
        if torch.is_autocast_enabled(device):
            # Once per search instead of every step: values in the autocast dtype (the context
            # product reads half the bytes), keys in float32 (the scorer's elementwise maths is
            # faster, and more precise, in float32 on CPUs).
            attn = attn._replace(keys=attn.keys.float(), values=attn.values.to(torch.get_autocast_dtype(device)))
        # Reused by every step: a few items at a time, so it stays in cache.
        return out._replace(attn=attn, scratch=self.attention.new_scratch(attn, beam_size))

    def init_state(self, memory: SATMemory) -> SATState:
        """Initial state from the mean feature: (h, c) (N, D), plus the sentinel or fed vector."""
        mean = memory.mean
        h, c = torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))
        sentinel = torch.tanh(self.init_sentinel(mean)) if self.sentinel and self.query == "previous" else None
        feed = mean.new_zeros(mean.shape[0], self.decoder_dim) if self.query == "current" else None
        return SATState(h, c, sentinel, feed)

    def _sentinel_rows(self, s: Tensor, group: int = 1) -> PreparedMemory:
        """Sentinel s (N, D) -> the extra position's keys/values per query: (B, [H,] K, .)."""
        f = self.sentinel_proj(s)
        return self.attention.prepare(f.view(-1, group, f.shape[-1]))

    def _attend(self, h: Tensor, memory: SATMemory, s: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Query state h (N, D) [, sentinel s (N, D)] -> context (N, C), alpha (N, S), beta (N,) or None.
        N = B, or B*K after :meth:`expand_memory` (an item's K queries attend at once)."""
        if self.attention is None:
            s_len = memory.num_positions
            return memory.mean, memory.mean.new_full((h.shape[0], s_len), 1.0 / s_len), None
        query = h if self.query_proj is None else self.query_proj(h)
        group = memory.group
        extra = self._sentinel_rows(s, group) if self.sentinel else None
        out = self.attention.attend(query.view(-1, group, query.shape[-1]), memory.attn, extra, memory.scratch)
        n = h.shape[0]
        context, alpha = out.context.reshape(n, -1), out.alpha.reshape(n, -1)  # (B, K, .) -> (B*K, .)
        beta = None if out.beta is None else out.beta.reshape(n)
        if self.gate is not None:
            context = torch.sigmoid(self.gate(h)) * context
        return context, alpha, beta

    def _cell(self, x_gates: Tensor, extra: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """One LSTM update; x_gates (N, G) is the embedding part of the input projection, extra the
        context ("previous") or fed-back vector ("current"). Returns h, c and the sentinel (or None)."""
        linear = self.input_context if self.query == "previous" else self.input_feed
        gates = x_gates + linear(extra) + self.recurrent(h)
        return lstm_cell(gates, c, self.sentinel)

    def _advance(self, x_gates: Tensor, state: SATState, memory: SATMemory):
        """One step from the embedding gates -> (output vector (N, D), alpha, beta, new state)."""
        if self.query == "previous":
            context, alpha, beta = self._attend(state.h, memory, state.sentinel)
            h, c, s = self._cell(x_gates, context, state.h, state.c)
            return h, alpha, beta, SATState(h, c, s)
        h, c, s = self._cell(x_gates, state.feed, state.h, state.c)
        context, alpha, beta = self._attend(h, memory, s)
        feed = torch.tanh(self.combine(torch.cat([h, context], -1)))
        return feed, alpha, beta, SATState(h, c, None, feed)

    def step(self, tokens: Tensor, state: SATState, memory: SATMemory) -> StepOutput:
        """One decoding step: tokens (N,) previous words -> logits (N, V), alpha (N, S), new
        state, beta (N,) (None without a sentinel)."""
        out, alpha, beta, state = self._advance(self.input_embed(self.embedding(tokens)), state, memory)
        return StepOutput(self.output(self.dropout(out)), alpha, state, beta)

    # ------------------------------------------------------------------ teacher forcing
    @property
    def uses_fused_recurrence(self) -> bool:
        """True when :meth:`forward` runs the fused recurrence (every score and head count)."""
        return self.fused and self.attention is not None

    def _fused_forward(self, memory: SATMemory, inputs: Tensor, steps: Tensor | None = None) -> RecurrenceOutput:
        layer, d = self.attention, self.decoder_dim
        state = self.init_state(memory)
        x_gates = self.input_embed(self.embedding(inputs))  # (B, T, G): one GEMM for all steps
        qm = layer.fused_query_map()
        if qm is None:  # the scorer uses the query as is: the decoder's bridge, or the state itself
            like = self.recurrent.weight
            w_q = self.query_proj.weight if self.query_proj is not None else \
                torch.eye(d, dtype=like.dtype, device=like.device)
            b_q = None
        else:
            w_q, b_q = qm
            if self.query_proj is not None:
                w_q = w_q @ self.query_proj.weight
        # Every matrix that multiplies the state, stacked: one (B, D) x (D, R) GEMM a step.
        maps = [(self.recurrent.weight, None)]
        if self.gate is not None:
            maps.append((self.gate.weight, self.gate.bias))
        maps.append((w_q, b_q))
        if self.query == "current":
            maps.append((self.combine.weight[:, :d], self.combine.bias))
        w_h, b_h = stack_state_maps(maps)
        plan = RecurrencePlan(self.query, layer.scorer, layer.heads, self.gate is not None,
                              (lambda s: flat_rows(self._sentinel_rows(s))) if self.sentinel else None,
                              autocast_matmul_dtype(inputs.device))
        w_x = self.input_context.weight if self.query == "previous" else self.input_feed.weight
        w_u = self.combine.weight[:, d:] if self.query == "current" else None
        sentinel_params = (self.sentinel_proj.weight, *layer.parameters()) if self.sentinel else ()
        return fused_recurrence(plan, x_gates, memory.attn, state.h, state.c, state.sentinel, w_h, b_h,
                                w_x, w_u, layer.output_map(), layer.scorer.score_parameters(), sentinel_params,
                                steps)

    def forward(self, features: Tensor, inputs: Tensor, mask: Tensor | None = None,
                steps: Tensor | None = None) -> DecoderOutput:
        """Teacher-forced pass.

        Args:
            features: (B, S, C) image grid features.
            inputs: (B, T) input words (BOS w1 .. w_{T-1}); targets are the same shifted by one.
            mask: (B, S) which grid cells may be attended (None: all).
            steps: (B,) real target words per row (the rest is padding). The fused recurrence
                then skips each row's padding steps (their outputs are zeros; the plain loop
                computes them anyway): same loss and gradients when the loss ignores padding.
        Returns:
            logits (B, T, V), alphas (B, T, S), betas (B, T) or None.
        """
        out, alphas, betas = self.teacher_forced(features, inputs, mask, steps)
        return DecoderOutput(self.output(self.dropout(out)), alphas, betas)  # (B, T, V): one GEMM for all steps

    def teacher_forced(self, features: Tensor, inputs: Tensor, mask: Tensor | None = None,
                       steps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`forward` up to the output layer: the vectors ``output(dropout(.))`` turns into
        logits (B, T, D) (h_t, or h~_t with ``query: current``), alphas (B, T, S), betas (B, T)
        or None. The loss applies the output layer to the real words only."""
        memory = self.prepare_memory(features, mask)
        if self.uses_fused_recurrence:
            out, alphas, betas, _ = self._fused_forward(memory, inputs, steps)
            return out, alphas, betas
        x_gates = self.input_embed(self.embedding(inputs))  # (B, T, G): one GEMM for all steps
        return plain_steps(self._advance, x_gates, self.init_state(memory), memory, self.sentinel)


def flat_rows(rows: PreparedMemory) -> tuple[Tensor, Tensor]:
    """(B, [H,] 1, .) per-item extra rows -> (B*H, 1, .) as the fused recurrence flattens heads."""
    n = rows.values.shape[:-1].numel()  # explicit: location keys are (..., 0) wide
    return rows.keys.reshape(n, 1, rows.keys.shape[-1]), rows.values.reshape(n, 1, rows.values.shape[-1])
