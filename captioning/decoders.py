"""The Show, Attend and Tell decoder: an LSTM that attends over the image grid before every word.

Step t (Xu et al. 2015, with h_{t-1} as the query):
    context_t, alpha_t = attention(h_{t-1}, features)           # soft attention over S cells
    context_t = sigmoid(f_beta(h_{t-1})) * context_t            # gating scalar (per channel)
    h_t, c_t = LSTM([embed(y_{t-1}); context_t], (h_{t-1}, c_{t-1}))
    p(y_t) = softmax(W_out dropout(h_t))

Teacher forcing is written for speed: the embedding half of the LSTM input projection and
the output projection are one matrix product over all steps; only the recurrent part runs
in the Python loop, and the key projection is prepared once per image. With additive
attention (the Show-Attend-Tell default) the loop is :class:`captioning.sat_recurrence.SATRecurrence`:
the same maths with every product on h_{t-1} fused into one GEMM and a hand-written backward
that forms each weight gradient once over all steps (``fused=False`` runs the plain loop).

The step interface (``prepare_memory`` / ``init_state`` / ``step``) is what
:mod:`captioning.search` drives; the text seq2seq decoder implements the same one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from captioning.attention import AdditiveScorer, Attention, PreparedMemory, build_attention, compares_directly
from captioning.sat_recurrence import SATRecurrence, additive_attention_into


# Size of the attention scratch of search (elements): 8 MB in float32, fits the last-level
# cache; larger chunks fall out of it, smaller ones mean more (parallel) ops per step.
SCRATCH_ELEMENTS = 1 << 21


class DecoderOutput(NamedTuple):
    """logits (B, T, V); alphas (B, T, S) attention of every step."""

    logits: Tensor
    alphas: Tensor


class ShowAttendTellDecoder(nn.Module):
    """LSTM decoder with soft attention over a grid of image features.

    Args:
        vocab_size: V.
        encoder_dim: C, channels of each grid cell.
        embed_dim, decoder_dim, attention_dim: E, D, A.
        attention: score function name (see :data:`captioning.attention.SCORERS`) or ``"none"``
            (no attention: the mean feature is a fixed context at every step, the baseline).
        num_heads: > 1 for multi-head attention.
        gate: use the gating scalar beta_t.
        dropout: before the output projection.
        max_positions: S, needed by the ``location`` score (grid H*W).
        fused: teacher forcing with additive attention uses the fused recurrence (same
            outputs and gradients as the plain loop, faster); False forces the plain loop.
    """

    def __init__(self, vocab_size: int, encoder_dim: int, embed_dim: int = 512, decoder_dim: int = 512,
                 attention_dim: int = 512, attention: str = "additive", num_heads: int = 1, gate: bool = True,
                 dropout: float = 0.5, max_positions: int | None = None, fused: bool = True) -> None:
        super().__init__()
        self.fused = fused
        self.vocab_size, self.encoder_dim, self.decoder_dim = vocab_size, encoder_dim, decoder_dim
        self.attention_name = attention
        # Dot-product scores compare the query with the keys directly, so they need the same
        # size: when the LSTM state is not C wide, the decoder projects its query (the layer
        # itself stays strict about it).
        needs_same_size = compares_directly(attention, num_heads) and decoder_dim != encoder_dim
        self.query_proj = nn.Linear(decoder_dim, encoder_dim, bias=False) if needs_same_size else None
        query_dim = encoder_dim if needs_same_size else decoder_dim
        self.attention = build_attention(attention, query_dim, encoder_dim, attention_dim, num_heads, max_positions)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.gate = nn.Linear(decoder_dim, encoder_dim) if gate and self.attention is not None else None
        # LSTM cell with its input projection split by input: embedding / context / state.
        self.input_embed = nn.Linear(embed_dim, 4 * decoder_dim)  # carries the LSTM bias
        self.input_context = nn.Linear(encoder_dim, 4 * decoder_dim, bias=False)
        self.recurrent = nn.Linear(decoder_dim, 4 * decoder_dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(decoder_dim, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.output.bias)
        nn.init.uniform_(self.output.weight, -0.1, 0.1)
        with torch.no_grad():  # forget-gate bias 1: remember by default early in training
            self.input_embed.bias.zero_()
            self.input_embed.bias[self.decoder_dim: 2 * self.decoder_dim] = 1.0

    # ------------------------------------------------------------------ step interface
    def prepare_memory(self, features: Tensor, mask: Tensor | None = None) -> dict:
        """Everything that does not change across steps. features (B, S, C); mask (B, S) bool.

        Returns a dict: ``attn`` (PreparedMemory, keys projected once), ``mean`` (B, C) the
        mean feature (initial state, and the fixed context without attention), and
        ``num_positions`` (int S). Tensors are batch-first so search can expand them.
        """
        if mask is None:
            mean = features.mean(1)
        else:
            m = mask.unsqueeze(-1).to(features.dtype)
            mean = (features * m).sum(1) / m.sum(1).clamp(min=1)
        attn = self.attention.prepare(features, features, mask) if self.attention is not None else None
        return {"attn": attn, "mean": mean, "num_positions": features.shape[1]}

    def expand_memory(self, memory: dict, beam_size: int) -> dict:
        """Memory for ``beam_size`` hypotheses per item (beam search), WITHOUT copying the grid:
        the step then attends with the K queries of an item at once, so each step reads the
        (B, S, C) features once instead of K times. Only ``mean`` (B, C), which seeds the
        initial state, is repeated to (B*K, C). Greedy search calls it with ``beam_size=1``.
        """
        out = dict(memory)
        if beam_size > 1:
            out.update(mean=memory["mean"].repeat_interleave(beam_size, 0), group=beam_size)
        attn = memory["attn"]
        device = attn.keys.device.type if attn is not None else "cpu"
        if self._additive and not torch.is_grad_enabled() and torch.is_autocast_enabled(device):
            # Once per search instead of every step: values in the autocast dtype (the context
            # product reads half the bytes), keys in float32 (the attention's elementwise maths
            # is faster, and more precise, in float32 on CPUs).
            attn = attn._replace(keys=attn.keys.float(), values=attn.values.to(torch.get_autocast_dtype(device)))
            out["attn"] = attn
        if self._additive and not torch.is_grad_enabled():
            # Reused by every step (see _attend): a few items at a time, so it stays in cache.
            per_item = beam_size * attn.keys.shape[1] * attn.keys.shape[2]
            n = max(1, min(attn.keys.shape[0], SCRATCH_ELEMENTS // per_item))
            out["scratch"] = attn.keys.new_empty(n, beam_size, *attn.keys.shape[1:])
        return out

    def init_state(self, memory: dict) -> dict:
        """Initial (h, c) from the mean feature: dict of (B, D) tensors."""
        mean = memory["mean"]
        return {"h": torch.tanh(self.init_h(mean)), "c": torch.tanh(self.init_c(mean))}

    def _attend(self, h: Tensor, memory: dict) -> tuple[Tensor, Tensor]:
        """h (N, D) -> context (N, C), alpha (N, S); N = B, or B*K after :meth:`expand_memory`."""
        if self.attention is None:
            s = memory["num_positions"]
            alpha = memory["mean"].new_full((h.shape[0], s), 1.0 / s)
            return memory["mean"], alpha
        attn: PreparedMemory = memory["attn"]
        query = h if self.query_proj is None else self.query_proj(h)
        group = memory.get("group", 1)
        scratch = memory.get("scratch")
        if scratch is not None and not torch.is_grad_enabled():  # search: no large temporaries
            context, alpha = additive_attention_into(self.attention.scorer, query.view(-1, group, query.shape[-1]),
                                                     attn.keys, attn.values, attn.mask, scratch)
            context, alpha = context.reshape(h.shape[0], -1), alpha.reshape(h.shape[0], -1)
        elif group > 1:  # K hypotheses per item (expand_memory): the item's K queries attend at once
            context, alpha = self.attention(query.view(-1, group, query.shape[-1]), attn)  # (B, K, C), (B, K, S)
            context, alpha = context.reshape(h.shape[0], -1), alpha.reshape(h.shape[0], -1)
        else:
            context, alpha = self.attention(query, attn)
        if self.gate is not None:
            context = torch.sigmoid(self.gate(h)) * context
        return context, alpha

    def _cell(self, x_gates: Tensor, context: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One LSTM update; x_gates (B, 4D) is the embedding part of the input projection."""
        gates = x_gates + self.input_context(context) + self.recurrent(h)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c

    def step(self, tokens: Tensor, state: dict, memory: dict) -> tuple[Tensor, Tensor, dict]:
        """One decoding step. tokens (B,) previous words -> logits (B, V), alpha (B, S), new state."""
        h, c = state["h"], state["c"]
        context, alpha = self._attend(h, memory)
        h, c = self._cell(self.input_embed(self.embedding(tokens)), context, h, c)
        return self.output(self.dropout(h)), alpha, {"h": h, "c": c}

    # ------------------------------------------------------------------ teacher forcing
    @property
    def _additive(self) -> bool:
        return isinstance(self.attention, Attention) and isinstance(self.attention.scorer, AdditiveScorer)

    @property
    def uses_fused_recurrence(self) -> bool:
        """True when :meth:`forward` runs :class:`SATRecurrence` (single-head additive attention)."""
        return self.fused and self._additive

    def _fused_forward(self, memory: dict, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """(hidden (B, T, D), alphas (B, T, S)) through SATRecurrence; see its docstring."""
        scorer: AdditiveScorer = self.attention.scorer
        state = self.init_state(memory)
        x_gates = self.input_embed(self.embedding(inputs))  # (B, T, 4D): one GEMM for all steps
        # Every matrix that multiplies h_{t-1}, stacked: one (B, D) x (D, 4D + C + A) GEMM a step.
        parts = [self.recurrent.weight] + ([self.gate.weight] if self.gate is not None else [])
        w_h = torch.cat(parts + [scorer.query_proj.weight], 0)
        device = inputs.device.type
        matmul_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        attn: PreparedMemory = memory["attn"]
        return SATRecurrence.apply(x_gates, attn.keys, attn.values, attn.mask, state["h"], state["c"], w_h,
                                   None if self.gate is None else self.gate.bias, scorer.v.weight.view(-1),
                                   self.input_context.weight, matmul_dtype)

    def forward(self, features: Tensor, inputs: Tensor, mask: Tensor | None = None) -> DecoderOutput:
        """Teacher-forced pass.

        Args:
            features: (B, S, C) image grid features.
            inputs: (B, T) input words (BOS w1 .. w_{T-1}); targets are the same shifted by one.
            mask: (B, S) which grid cells may be attended (None: all).
        Returns:
            logits (B, T, V) and alphas (B, T, S).
        """
        memory = self.prepare_memory(features, mask)
        if self.uses_fused_recurrence:
            hidden, alphas = self._fused_forward(memory, inputs)
            return DecoderOutput(self.output(self.dropout(hidden)), alphas)
        state = self.init_state(memory)
        h, c = state["h"], state["c"]
        x_gates = self.input_embed(self.embedding(inputs))  # (B, T, 4D): one GEMM for all steps
        hs, alphas = [], []
        for t in range(inputs.shape[1]):
            context, alpha = self._attend(h, memory)
            h, c = self._cell(x_gates[:, t], context, h, c)
            hs.append(h)
            alphas.append(alpha)
        hidden = torch.stack(hs, 1)  # (B, T, D)
        logits = self.output(self.dropout(hidden))  # (B, T, V): one GEMM for all steps
        return DecoderOutput(logits, torch.stack(alphas, 1))
