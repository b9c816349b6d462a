"""The text decoder: an attention LSTM decoder over the states of :mod:`captioning.text_encoder`.

The decoder uses the SAME attention layer as the image captioner
(:func:`captioning.attention.build_attention`) and implements the SAME step interface as
:class:`captioning.image_decoder.ShowAttendTellDecoder` (``prepare_memory`` / ``init_state`` /
``step``), so :func:`captioning.search.greedy_search` and :func:`~captioning.search.beam_search`
drive it unchanged.

Two query styles (who asks the attention layer, and when):

``bahdanau`` (Bahdanau et al. 2015): the PREVIOUS state asks, the context enters the LSTM::

    c_t, alpha_t = attention(h_{t-1}, encoder states)
    h_t = LSTM([embed(y_{t-1}); c_t], h_{t-1})
    p(y_t) = softmax(W_out tanh(W_c [h_t; c_t]))

``luong`` (Luong et al. 2015, with input feeding): the CURRENT state asks, and the
attentional vector of the previous step is fed back as input::

    h_t = LSTM([embed(y_{t-1}); h~_{t-1}], h_{t-1})
    c_t, alpha_t = attention(h_t, encoder states)
    h~_t = tanh(W_c [h_t; c_t]);   p(y_t) = softmax(W_out h~_t)

``sentinel=True`` (Lu et al. 2017, as in :class:`captioning.image_decoder.ShowAttendTellDecoder`): a
fifth LSTM gate g_t gives s_t = sigmoid(g_t) * tanh(c_t) (what the decoder's language state
already knows), projected to the width of an encoder state and attended as one more source
position by the same score (its key goes through the same bridge as the encoder states).
beta_t is its weight, how much target token t relies on the language state instead of the
source: c_t = beta_t s + (1 - beta_t) sum_i alpha_ti h_i. ``bahdanau`` attends with the sentinel of
the previous step (s_0 = tanh(W summary)), ``luong`` with that of the step itself. ``alphas``
are the source weights renormalised over the real source positions (rows sum to 1, padding
gets exactly 0); ``betas`` carry beta_t (``DecoderOutput.betas``, ``StepOutput.beta``, and
``SearchResult.betas`` through search).

``attention="none"`` is the fixed-context baseline (Cho et al. 2014 "RNNenc"): ``c_t`` is the
encoder summary (last forward + first backward state) at every step; its reported alpha is
uniform over the real source positions.

Speed: in teacher forcing the embedding part of the LSTM input and everything after the
recurrence (``W_c``, the output layer) are one matrix product over all steps; only the
recurrence runs step by step. With any score and multi-head, and either query style, that
recurrence is the Show-Attend-Tell one without its gate (Luong: the current-state query with
input feeding; the sentinel as the image decoder's), so it runs through
:func:`captioning.sat_recurrence.fused_recurrence` (one autograd node, every product on the state
in one GEMM, each weight gradient formed once over all steps); ``fused=False`` runs the plain
autograd loop (same outputs and gradients; tests/test_text_decoder.py and tests/test_text_sentinel.py
check both).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioning.attention import PreparedMemory, build_attention, compares_directly
from captioning.image_decoder import DecoderOutput, flat_rows
from captioning.sat_recurrence import (RecurrencePlan, autocast_matmul_dtype, fused_recurrence, lstm_cell,
                                       plain_steps, stack_state_maps)
from captioning.search import StepOutput

QUERY_STYLES = ("bahdanau", "luong")


class AttentionLSTMDecoder(nn.Module):
    """LSTM decoder attending over encoder states before every word (see module docstring).

    Args:
        vocab_size: V (target vocabulary).
        encoder_dim: C, width of each encoder state (2H for :class:`captioning.text_encoder.BiLSTMEncoder`).
        embed_dim, decoder_dim, attention_dim: E, D, A.
        attention: a score of :data:`captioning.attention.SCORERS` (or alias) or ``"none"``.
        query: ``"bahdanau"`` (previous state) or ``"luong"`` (current state + input feeding).
        num_heads: > 1 for multi-head attention.
        dropout: on the vector fed to the output layer.
        max_positions: longest source (S incl. EOS); only the ``location`` score needs it.
        fused: teacher forcing through the fused recurrence (module docstring); False: plain loop.
        sentinel: a language sentinel joins the attended source positions (module docstring).
    """

    def __init__(self, vocab_size: int, encoder_dim: int, embed_dim: int = 128, decoder_dim: int = 256,
                 attention_dim: int = 128, attention: str = "additive", query: str = "bahdanau",
                 num_heads: int = 1, dropout: float = 0.2, max_positions: int | None = None,
                 fused: bool = True, sentinel: bool = False) -> None:
        super().__init__()
        self.fused, self.sentinel = fused, sentinel
        if query not in QUERY_STYLES:
            raise ValueError(f"query must be one of {QUERY_STYLES}, got {query!r}")
        if sentinel and (attention is None or attention == "none"):
            raise ValueError("sentinel=True needs an attention score (the sentinel joins the attended source)")
        self.vocab_size, self.encoder_dim, self.decoder_dim = vocab_size, encoder_dim, decoder_dim
        self.query, self.attention_name = query, attention
        # Dot-product scores need query and key of one size: project the keys (values stay the
        # encoder states, so the context keeps width C) instead of forcing D == C on the user.
        needs_bridge = compares_directly(attention, num_heads) and encoder_dim != decoder_dim
        self.key_bridge = nn.Linear(encoder_dim, decoder_dim, bias=False) if needs_bridge else None
        key_dim = decoder_dim if needs_bridge else encoder_dim
        positions = max_positions + 1 if sentinel and max_positions else max_positions  # + the sentinel
        self.attention = build_attention(attention, decoder_dim, key_dim, attention_dim, num_heads, positions)
        # A score with its own sentinel score (``location``) scores the sentinel by its index, S. S
        # is the padded width of a batch, so such memories are padded to a fixed width, keeping an
        # item's output independent of its batch (padding gets exactly 0 weight).
        self.fixed_width = max_positions if sentinel and max_positions and \
            self.attention.scorer.offers("scores_paired") else None
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        # LSTM input projection split by input (embedding / context or fed-back vector / state),
        # so the embedding part is one matrix product over all steps in teacher forcing.
        # A fifth gate block makes the sentinel.
        gates = (5 if sentinel else 4) * decoder_dim
        self.input_embed = nn.Linear(embed_dim, gates)  # carries the LSTM bias
        extra_dim = encoder_dim if query == "bahdanau" else decoder_dim
        self.input_extra = nn.Linear(extra_dim, gates, bias=False)
        self.recurrent = nn.Linear(decoder_dim, gates, bias=False)
        self.combine = nn.Linear(decoder_dim + encoder_dim, decoder_dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(decoder_dim, vocab_size)
        # The sentinel's modules come last, so the default decoder is built (and seeded) as before.
        if sentinel:
            self.sentinel_proj = nn.Linear(decoder_dim, encoder_dim, bias=False)  # s_t -> one more "encoder state"
            if query == "bahdanau":
                self.init_sentinel = nn.Linear(encoder_dim, decoder_dim)
        with torch.no_grad():  # forget-gate bias 1: remember by default early in training
            self.input_embed.bias.zero_()
            self.input_embed.bias[decoder_dim: 2 * decoder_dim] = 1.0

    # ------------------------------------------------------------------ step interface
    def prepare_memory(self, states: Tensor, mask: Tensor | None = None, summary: Tensor | None = None) -> dict:
        """Everything that does not change across steps.

        Args:
            states: (B, S, C) encoder states; mask: (B, S) bool, True = real source token.
            summary: (B, C) fixed sentence vector (initial state; the context without
                attention); default: the mean of the unmasked states.
        Returns:
            dict of batch-first tensors (search expands them per beam): ``attn``
            (PreparedMemory, keys projected once, or None), ``summary`` (B, C), ``mask`` (B, S).
            With :attr:`fixed_width` ``attn`` is padded to that many positions; ``mask`` keeps S.
        """
        if mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        if summary is None:
            m = mask.unsqueeze(-1).to(states.dtype)
            summary = (states * m).sum(1) / m.sum(1).clamp(min=1)
        attn = None
        if self.attention is not None:
            wide_states, wide_mask = states, mask
            if self.fixed_width is not None and states.shape[1] < self.fixed_width:
                pad = self.fixed_width - states.shape[1]
                wide_states, wide_mask = F.pad(states, (0, 0, 0, pad)), F.pad(mask, (0, pad), value=False)
            attn = self.attention.prepare(self._keys(wide_states), wide_states, wide_mask)
        return {"attn": attn, "summary": summary, "mask": mask}

    def _keys(self, states: Tensor) -> Tensor:
        """Encoder states (or sentinels mapped to their width) (..., C) -> what the layer scores against."""
        return states if self.key_bridge is None else self.key_bridge(states)

    def init_state(self, memory: dict) -> dict:
        """Initial state from the summary: {"h", "c"} (B, D), plus "feed" (B, D) for luong and
        "sentinel" (B, D) s_0 for bahdanau with a sentinel."""
        summary = memory["summary"]
        state = {"h": torch.tanh(self.init_h(summary)), "c": torch.tanh(self.init_c(summary))}
        if self.query == "luong":
            state["feed"] = summary.new_zeros(summary.shape[0], self.decoder_dim)
        elif self.sentinel:
            state["sentinel"] = torch.tanh(self.init_sentinel(summary))
        return state

    def _sentinel_rows(self, s: Tensor) -> PreparedMemory:
        """Sentinel s (N, D) -> the extra position's keys/values per query: (N, [H,] 1, .)."""
        f = self.sentinel_proj(s).unsqueeze(1)  # (N, 1, C): one more encoder state per query
        return self.attention.prepare(self._keys(f), f)

    def _attend(self, query: Tensor, memory: dict, s: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """query (B, D) [, sentinel s (B, D)] -> context (B, C), alpha (B, S), beta (B,) or None."""
        if self.attention is None:
            mask = memory["mask"].to(query.dtype)
            return memory["summary"], mask / mask.sum(1, keepdim=True).clamp(min=1), None
        out = self.attention.attend(query, memory["attn"], self._sentinel_rows(s) if self.sentinel else None)
        return out.context, out.alpha[:, :memory["mask"].shape[1]], out.beta  # (cut a fixed-width pad)

    def _cell(self, x_gates: Tensor, extra: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """One LSTM update -> h, c (B, D) and the sentinel s (B, D) or None."""
        gates = x_gates + self.input_extra(extra) + self.recurrent(h)  # (B, 4D) or (B, 5D)
        return lstm_cell(gates, c, self.sentinel)

    def _advance(self, x_gates: Tensor, state: dict, memory: dict) -> tuple[Tensor, Tensor, Tensor | None, dict]:
        """One step given the embedding gates (B, G) -> attentional vector (B, D), alpha (B, S),
        beta (B,) or None, state."""
        if self.query == "bahdanau":
            # query: previous state (and the previous step's sentinel)
            context, alpha, beta = self._attend(state["h"], memory, state.get("sentinel"))
            h, c, s = self._cell(x_gates, context, state["h"], state["c"])
            attentional = torch.tanh(self.combine(torch.cat([h, context], -1)))
            return attentional, alpha, beta, {"h": h, "c": c} if s is None else {"h": h, "c": c, "sentinel": s}
        h, c, s = self._cell(x_gates, state["feed"], state["h"], state["c"])
        context, alpha, beta = self._attend(h, memory, s)  # query: current state
        attentional = torch.tanh(self.combine(torch.cat([h, context], -1)))
        return attentional, alpha, beta, {"h": h, "c": c, "feed": attentional}

    def step(self, tokens: Tensor, state: dict, memory: dict) -> StepOutput:
        """tokens (B,) previous words -> logits (B, V), alpha (B, S), new state, beta (B,) (None
        without a sentinel)."""
        attentional, alpha, beta, state = self._advance(self.input_embed(self.embedding(tokens)), state, memory)
        return StepOutput(self.output(self.dropout(attentional)), alpha, state, beta)

    # ------------------------------------------------------------------ teacher forcing
    @property
    def uses_fused_recurrence(self) -> bool:
        """True when teacher forcing runs the fused recurrence (every score, heads and query style)."""
        return self.fused and self.attention is not None

    def attentional(self, states: Tensor, inputs: Tensor, mask: Tensor | None = None,
                    summary: Tensor | None = None, steps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass up to the output layer: states (B, S, C), inputs (B, T) = BOS y_1 ..
        y_{T-1}, mask (B, S) -> attentional vectors (B, T, D), alphas (B, T, S) (row t is the
        attention used to predict y_{t+1}). ``output(dropout(.))`` of the first gives the logits.
        steps (B,): real target tokens per row; the fused recurrence skips the padding steps
        after them (outputs there are not meaningful). :meth:`teacher_forced` also returns the
        sentinel weights."""
        return self.teacher_forced(states, inputs, mask, summary, steps)[:2]

    def teacher_forced(self, states: Tensor, inputs: Tensor, mask: Tensor | None = None,
                       summary: Tensor | None = None,
                       steps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`attentional` plus betas (B, T), the sentinel's weight of every step (or None)."""
        memory = self.prepare_memory(states, mask, summary)
        state = self.init_state(memory)
        x_gates = self.input_embed(self.embedding(inputs))  # (B, T, G): one GEMM for all steps
        if self.uses_fused_recurrence:
            return self._fused(memory, state, x_gates, steps)
        return plain_steps(self._advance, x_gates, state, memory, self.sentinel)

    def _fused(self, memory: dict, state: dict, x_gates: Tensor,
               steps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The time loop as one autograd node: every matrix that multiplies the state stacked in one
        GEMM (recurrent gates, the attention's query map, Luong's combine half), the scores through
        the scorer's own hooks, the sentinel through the image decoder's machinery
        (captioning.sat_recurrence)."""
        layer, d, luong = self.attention, self.decoder_dim, self.query == "luong"
        query_map = layer.fused_query_map()
        w = self.recurrent.weight
        w_q, b_q = query_map if query_map is not None else (torch.eye(d, dtype=w.dtype, device=w.device), None)
        maps = [(w, None), (w_q, b_q)]
        if luong:
            maps.append((self.combine.weight[:, :d], self.combine.bias))
        w_h, b_h = stack_state_maps(maps)
        plan = RecurrencePlan("current" if luong else "previous", layer.scorer, layer.heads, gate=False,
                              sentinel_rows=(lambda s: flat_rows(self._sentinel_rows(s))) if self.sentinel else None,
                              matmul_dtype=autocast_matmul_dtype(x_gates.device))
        sentinel_params = ()
        if self.sentinel:  # everything _sentinel_rows and the scorer's scores_paired may read
            bridge = () if self.key_bridge is None else (self.key_bridge.weight,)
            sentinel_params = (self.sentinel_proj.weight, *bridge, *layer.parameters())
        out = fused_recurrence(plan, x_gates, memory["attn"], state["h"], state["c"], state.get("sentinel"),
                               w_h, b_h, self.input_extra.weight,
                               self.combine.weight[:, d:] if luong else None, layer.output_map(),
                               layer.scorer.score_parameters(), sentinel_params, steps)
        alphas = out.alphas[..., :memory["mask"].shape[1]]  # (cut a fixed-width pad)
        if luong:
            return out.out, alphas, out.betas
        return torch.tanh(self.combine(torch.cat([out.out, out.contexts], -1))), alphas, out.betas

    def forward(self, states: Tensor, inputs: Tensor, mask: Tensor | None = None,
                summary: Tensor | None = None, steps: Tensor | None = None) -> DecoderOutput:
        """Teacher-forced pass: states (B, S, C), inputs (B, T) = BOS y_1 .. y_{T-1}, mask (B, S)
        -> logits (B, T, V), alphas (B, T, S) (row t is the attention used to predict y_{t+1}),
        betas (B, T) or None. steps (B,): as in :meth:`attentional`."""
        attentional, alphas, betas = self.teacher_forced(states, inputs, mask, summary, steps)
        return DecoderOutput(self.output(self.dropout(attentional)), alphas, betas)  # one GEMM for all steps
