"""What both attention-LSTM decoders share: the LSTM with its split input projection, the
attention layer and how it is asked, the visual/language sentinel, the step interface search
drives, and teacher forcing through the fused recurrence.

The image decoder (:mod:`captioning.nn.image_decoder`) and the text decoder
(:mod:`captioning.nn.text_decoder`) keep only what differs: the image one gates the context
(f_beta) and bridges a dot-product query to the feature size; the text one bridges the keys to
the state size, and (with the previous-state query) outputs tanh(W_c [h_t; c_t]).

Where the decoder looks (``query``: ``previous`` or ``current``) and the sentinel, as equations:
:mod:`captioning.nn.decoder_state`, beside the state they define.

``attention="none"`` is the fixed-context baseline: the mean (or given summary) vector is the
context at every step; its reported alpha is uniform over the real positions.

Teacher forcing is written for speed: the embedding half of the LSTM input projection and the
output projection are one matrix product over all steps; the key projection is prepared once;
the loop is :func:`captioning.nn.recurrence.fused_recurrence` (every product on the state in
one GEMM, a hand-written backward forming each weight gradient once over all steps) for every
score, head count, query style and the sentinel; ``fused=False`` runs the plain autograd loop,
the reference the tests compare against. ``padding`` says how teacher forcing skips padding
steps (:class:`captioning.nn.recurrence.Schedule`): ``auto`` shrinks the batch on CPUs and
masks (no host sync, CUDA-graph friendly) on GPUs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from captioning.nn.attention import PreparedMemory, build_attention
from captioning.nn.decoder_state import (
    DecoderMemory,
    DecoderOutput,
    DecoderState,
    canonical_query,
    stack_state_maps,
)
from captioning.nn.recurrence import (
    RecurrenceOutput,
    RecurrencePlan,
    RecurrenceWeights,
    autocast_matmul_dtype,
    flat_rows,
    fused_recurrence,
    lstm_cell,
    plain_steps,
    resolve_padding,
)
from captioning.nn.search import StepOutput


class AttentionDecoderCore(nn.Module):
    """The attention LSTM decoder both models use (module docstring); subclasses say what differs.

    Args:
        vocab_size: V. memory_dim: C, width of each memory vector (grid cell / encoder state).
        embed_dim, decoder_dim, attention_dim: E, D, A.
        attention: a score of :data:`captioning.nn.attention.SCORERS` (or alias) or ``"none"``.
        num_heads: > 1 for multi-head attention. dropout: before the output layer.
        max_positions: the largest S (only the ``location`` score needs it); one more position
            is added for the sentinel.
        fused: teacher forcing through the fused recurrence; False: the plain autograd loop.
        query: ``previous`` / ``current`` (aliases ``bahdanau`` / ``luong``).
        sentinel: a sentinel joins the attended positions.
        gate: the f_beta gate on the context (image decoder).
        bridge: ``"query"`` (project a dot-product query to C) or ``"keys"`` (project the keys
            to D), used only when a dot-product score meets D != C.
        combine_previous: with ``previous``, output tanh(W_c [h_t; context_t]) instead of h_t.
        padding: how teacher forcing skips padding (``auto`` | ``shrink`` | ``mask``).
    """

    def __init__(
        self,
        vocab_size: int,
        memory_dim: int,
        embed_dim: int,
        decoder_dim: int,
        attention_dim: int,
        attention: str,
        num_heads: int,
        dropout: float,
        max_positions: int | None,
        fused: bool,
        query: str,
        sentinel: bool,
        gate: bool,
        bridge: str,
        combine_previous: bool,
        padding: str = "auto",
    ) -> None:
        super().__init__()
        query = canonical_query(query)
        if sentinel and (attention is None or attention == "none"):
            raise ValueError("sentinel=True needs an attention score (the sentinel joins the attended positions)")
        resolve_padding(padding, torch.device("cpu"))  # checks the name
        self.fused, self.query, self.sentinel, self.padding = fused, query, sentinel, padding
        self.vocab_size, self.encoder_dim, self.decoder_dim = vocab_size, memory_dim, decoder_dim
        self.attention_name = attention
        self.combine_previous = combine_previous
        from captioning.nn.attention import compares_directly

        # Dot-product scores compare the query with the keys directly, so they need the same size:
        # one side is projected (the layer itself stays strict about it).
        needs_bridge = compares_directly(attention, num_heads) and decoder_dim != memory_dim
        self.query_proj = nn.Linear(decoder_dim, memory_dim, bias=False) if needs_bridge and bridge == "query" else None
        self.key_bridge = nn.Linear(memory_dim, decoder_dim, bias=False) if needs_bridge and bridge == "keys" else None
        query_dim = memory_dim if self.query_proj is not None else decoder_dim
        key_dim = decoder_dim if self.key_bridge is not None else memory_dim
        positions = max_positions + 1 if sentinel and max_positions else max_positions  # + the sentinel
        self.attention = build_attention(attention, query_dim, key_dim, attention_dim, num_heads, positions)
        # A score with its own sentinel score (``location``) scores the sentinel by its index, S:
        # memories are then padded to a fixed width so an item's output does not depend on its batch.
        self.fixed_width = (
            max_positions
            if sentinel
            and max_positions
            and self.attention is not None
            and self.attention.scorer.offers("scores_paired")
            else None
        )
        # Modules are created in the order of the two decoders this core replaced, so seeded runs
        # (and their checkpoints) reproduce exactly.
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.init_h = nn.Linear(memory_dim, decoder_dim)
        self.init_c = nn.Linear(memory_dim, decoder_dim)
        self.gate = nn.Linear(decoder_dim, memory_dim) if gate and self.attention is not None else None
        # The LSTM cell with its input projection split by input: embedding (carries the bias) /
        # context or fed-back vector / state; a fifth gate block makes the sentinel.
        gates = (5 if sentinel else 4) * decoder_dim
        extra_dim = memory_dim if query == "previous" else decoder_dim
        self.input_embed = nn.Linear(embed_dim, gates)
        late = query == "current" and not combine_previous
        if not late:
            self.input_extra = nn.Linear(extra_dim, gates, bias=False)
        self.recurrent = nn.Linear(decoder_dim, gates, bias=False)
        if combine_previous:
            self.combine = nn.Linear(decoder_dim + memory_dim, decoder_dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(decoder_dim, vocab_size)
        if late:
            self.input_extra = nn.Linear(extra_dim, gates, bias=False)
            self.combine = nn.Linear(decoder_dim + memory_dim, decoder_dim)
        if sentinel:
            self.sentinel_proj = nn.Linear(decoder_dim, memory_dim, bias=False)  # s_t -> one more memory vector
            if query == "previous":
                self.init_sentinel = nn.Linear(memory_dim, decoder_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Forget-gate bias 1: remember by default early in training."""
        with torch.no_grad():
            self.input_embed.bias.zero_()
            self.input_embed.bias[self.decoder_dim : 2 * self.decoder_dim] = 1.0

    def padding_mode(self, device: torch.device) -> str:
        """How teacher forcing on ``device`` skips padding: ``shrink`` (host plan) or ``mask``
        (device plan, no host sync); the loss gathers its real tokens to match."""
        return resolve_padding(self.padding, device)

    # ------------------------------------------------------------------ step interface
    def prepare_memory(
        self, memory: Tensor, mask: Tensor | None = None, summary: Tensor | None = None
    ) -> DecoderMemory:
        """Everything that does not change across steps: memory (B, S, C) grid features or
        encoder states; mask (B, S) bool (True = real position); summary (B, C) (default: the
        mean of the real positions)."""
        if summary is None:
            if mask is None:
                summary = memory.mean(1)
            else:
                m = mask.unsqueeze(-1).to(memory.dtype)
                summary = (memory * m).sum(1) / m.sum(1).clamp(min=1)
        attn = None
        if self.attention is not None:
            wide, wide_mask = memory, mask
            if self.fixed_width is not None and memory.shape[1] < self.fixed_width:
                pad = self.fixed_width - memory.shape[1]
                wide = nn.functional.pad(memory, (0, 0, 0, pad))
                base = mask if mask is not None else memory.new_ones(memory.shape[:2], dtype=torch.bool)
                wide_mask = nn.functional.pad(base, (0, pad), value=False)
            attn = self.attention.prepare(self._keys(wide), wide, wide_mask)
        return DecoderMemory(attn, summary, mask, memory.shape[1])

    def _keys(self, memory: Tensor) -> Tensor:
        """Memory vectors (or sentinels mapped to their width) (..., C) -> what the layer scores."""
        return memory if self.key_bridge is None else self.key_bridge(memory)

    def expand_memory(self, memory: DecoderMemory, beam_size: int) -> DecoderMemory:
        """Memory for ``beam_size`` hypotheses per item (beam search), WITHOUT copying the memory:
        the step then attends with the K queries of an item at once, so each step reads the
        (B, S, C) memory once instead of K times. Only ``summary`` (B, C), which seeds the
        initial state, and ``mask`` are repeated to (B*K, .). Greedy search calls it with K = 1.
        """
        out = memory
        if beam_size > 1:
            rep = memory.mask.repeat_interleave(beam_size, 0) if memory.mask is not None else None
            out = out._replace(summary=memory.summary.repeat_interleave(beam_size, 0), mask=rep, group=beam_size)
        attn = memory.attn
        if (
            attn is None
            or self.attention is None
            or torch.is_grad_enabled()
            or not self.attention.scorer.offers("scores_into")
        ):
            return out
        device = attn.keys.device.type
        if torch.is_autocast_enabled(device):
            # Once per search instead of every step: values in the autocast dtype (the context
            # product reads half the bytes), keys in float32 (the scorer's elementwise maths is
            # faster, and more precise, in float32 on CPUs).
            attn = attn._replace(keys=attn.keys.float(), values=attn.values.to(torch.get_autocast_dtype(device)))
        # Reused by every step: a few items at a time, so it stays in cache.
        return out._replace(attn=attn, scratch=self.attention.new_scratch(attn, beam_size))

    def init_state(self, memory: DecoderMemory) -> DecoderState:
        """Initial state from the summary: (h, c) (N, D), plus the sentinel or fed vector."""
        summary = memory.summary
        h, c = torch.tanh(self.init_h(summary)), torch.tanh(self.init_c(summary))
        sentinel = torch.tanh(self.init_sentinel(summary)) if self.sentinel and self.query == "previous" else None
        feed = summary.new_zeros(summary.shape[0], self.decoder_dim) if self.query == "current" else None
        return DecoderState(h, c, sentinel, feed)

    def _sentinel_rows(self, s: Tensor, group: int = 1) -> PreparedMemory:
        """Sentinel s (N, D) -> the extra position's keys/values per query: (B, [H,] K, .)."""
        assert self.attention is not None, "a sentinel needs an attention layer"
        f = self.sentinel_proj(s).view(-1, group, self.encoder_dim)
        return self.attention.prepare(self._keys(f), f)

    def _attend(
        self, h: Tensor, memory: DecoderMemory, s: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Query state h (N, D) [, sentinel s (N, D)] -> context (N, C), alpha (N, S), beta (N,) or None.
        N = B, or B*K after :meth:`expand_memory` (an item's K queries attend at once)."""
        if self.attention is None:
            s_len = memory.num_positions
            if memory.mask is None:
                return memory.summary, memory.summary.new_full((h.shape[0], s_len), 1.0 / s_len), None
            real = memory.mask.to(h.dtype)
            return memory.summary, real / real.sum(1, keepdim=True).clamp(min=1), None
        query = h if self.query_proj is None else self.query_proj(h)
        assert memory.attn is not None
        group = memory.group
        extra = self._sentinel_rows(s, group) if self.sentinel and s is not None else None
        out = self.attention.attend(query.view(-1, group, query.shape[-1]), memory.attn, extra, memory.scratch)
        n = h.shape[0]
        context, alpha = out.context.reshape(n, -1), out.alpha.reshape(n, -1)[:, : memory.num_positions]
        beta = None if out.beta is None else out.beta.reshape(n)
        if self.gate is not None:
            context = torch.sigmoid(self.gate(h)) * context
        return context, alpha, beta

    def _cell(self, x_gates: Tensor, extra: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """One LSTM update; x_gates (N, G) is the embedding part of the input projection, extra the
        context (previous) or fed-back vector (current). Returns h, c and the sentinel (or None)."""
        return lstm_cell(x_gates + self.input_extra(extra) + self.recurrent(h), c, self.sentinel)

    def _combined(self, h: Tensor, context: Tensor) -> Tensor:
        return torch.tanh(self.combine(torch.cat([h, context], -1)))

    def _advance(self, x_gates: Tensor, state: DecoderState, memory: DecoderMemory):
        """One step from the embedding gates -> (output vector (N, D), alpha, beta, new state)."""
        if self.query == "previous":
            context, alpha, beta = self._attend(state.h, memory, state.sentinel)
            h, c, s = self._cell(x_gates, context, state.h, state.c)
            out = self._combined(h, context) if self.combine_previous else h
            return out, alpha, beta, DecoderState(h, c, s)
        assert state.feed is not None, "the current-state query feeds its attentional vector back"
        h, c, s = self._cell(x_gates, state.feed, state.h, state.c)
        context, alpha, beta = self._attend(h, memory, s)
        feed = self._combined(h, context)
        return feed, alpha, beta, DecoderState(h, c, None, feed)

    def step(self, tokens: Tensor, state: DecoderState, memory: DecoderMemory) -> StepOutput:
        """One decoding step: tokens (N,) previous words -> logits (N, V), alpha (N, S), new
        state, beta (N,) (None without a sentinel)."""
        out, alpha, beta, state = self._advance(self.input_embed(self.embedding(tokens)), state, memory)
        return StepOutput(self.output(self.dropout(out)), alpha, state, beta)

    # ------------------------------------------------------------------ teacher forcing
    @property
    def uses_fused_recurrence(self) -> bool:
        """True when teacher forcing runs the fused recurrence (every score and head count)."""
        return self.fused and self.attention is not None

    def _fused(self, memory: DecoderMemory, inputs: Tensor, steps: Tensor | None) -> RecurrenceOutput:
        """The time loop as one autograd node (captioning.nn.recurrence)."""
        layer, d = self.attention, self.decoder_dim
        assert layer is not None and memory.attn is not None, "the fused recurrence needs an attention layer"
        state = self.init_state(memory)
        x_gates = self.input_embed(self.embedding(inputs))  # (B, T, G): one GEMM for all steps
        qm = layer.fused_query_map()
        if qm is None:  # the scorer uses the query as is: the decoder's bridge, or the state itself
            like = self.recurrent.weight
            w_q = (
                self.query_proj.weight
                if self.query_proj is not None
                else torch.eye(d, dtype=like.dtype, device=like.device)
            )
            b_q = None
        else:
            w_q, b_q = qm
            if self.query_proj is not None:
                w_q = w_q @ self.query_proj.weight
        # Every matrix that multiplies the state, stacked: one (B, D) x (D, R) GEMM a step.
        maps: list[tuple[Tensor, Tensor | None]] = [(self.recurrent.weight, None)]
        if self.gate is not None:
            maps.append((self.gate.weight, self.gate.bias))
        maps.append((w_q, b_q))
        current = self.query == "current"
        if current:
            maps.append((self.combine.weight[:, :d], self.combine.bias))
        w_h, b_h = stack_state_maps(maps)
        out_w, out_b = layer.output_map() or (None, None)
        weights = RecurrenceWeights(
            w_h, b_h, self.input_extra.weight, self.combine.weight[:, d:] if current else None, out_w, out_b
        )
        plan = RecurrencePlan(
            self.query,
            layer.scorer,
            layer.heads,
            self.gate is not None,
            (lambda s: flat_rows(self._sentinel_rows(s))) if self.sentinel else None,
            autocast_matmul_dtype(inputs.device),
        )
        sentinel_params = ()
        if self.sentinel:  # everything _sentinel_rows and the scorer's scores_paired may read
            bridge = () if self.key_bridge is None else (self.key_bridge.weight,)
            sentinel_params = (self.sentinel_proj.weight, *bridge, *layer.parameters())
        return fused_recurrence(
            plan,
            x_gates,
            memory.attn,
            state.h,
            state.c,
            state.sentinel,
            weights,
            layer.scorer.score_parameters(),
            sentinel_params,
            steps,
            self.padding,
        )

    def teacher_forced(
        self,
        memory: Tensor,
        inputs: Tensor,
        mask: Tensor | None = None,
        summary: Tensor | None = None,
        steps: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`forward` up to the output layer: the vectors ``output(dropout(.))`` turns into
        logits (B, T, D), alphas (B, T, S), betas (B, T) or None."""
        prepared = self.prepare_memory(memory, mask, summary)
        if self.uses_fused_recurrence:
            out, alphas, betas, contexts = self._fused(prepared, inputs, steps)
            alphas = alphas[..., : prepared.num_positions]  # (cut a fixed-width pad)
            if self.query == "previous" and self.combine_previous:
                out = self._combined(out, contexts)
            return out, alphas, betas
        x_gates = self.input_embed(self.embedding(inputs))  # (B, T, G): one GEMM for all steps
        return plain_steps(self._advance, x_gates, self.init_state(prepared), prepared, self.sentinel)

    def forward(
        self,
        memory: Tensor,
        inputs: Tensor,
        mask: Tensor | None = None,
        summary: Tensor | None = None,
        steps: Tensor | None = None,
    ) -> DecoderOutput:
        """Teacher-forced pass.

        Args:
            memory: (B, S, C) grid features or encoder states; mask (B, S) (None: all real).
            inputs: (B, T) input words (BOS w1 .. w_{T-1}); targets are the same shifted by one.
            summary: (B, C) the vector seeding the state (default: the mean of the memory).
            steps: (B,) real target words per row (the rest is padding). The fused recurrence
                then skips each row's padding steps (their outputs are zeros; the plain loop
                computes them anyway): same loss and gradients when the loss ignores padding.
        Returns:
            logits (B, T, V), alphas (B, T, S) (row t is the attention used to predict word
            t + 1), betas (B, T) or None.
        """
        out, alphas, betas = self.teacher_forced(memory, inputs, mask, summary, steps)
        return DecoderOutput(self.output(self.dropout(out)), alphas, betas)  # one GEMM for all steps
