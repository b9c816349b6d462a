"""The Show, Attend and Tell decoder: an LSTM that attends over the image grid for every word.

What it adds to the shared attention-LSTM core (:mod:`captioning.nn.decoder_core`, which
documents the query styles, the visual sentinel and teacher forcing):

* the gating scalar (Xu et al. 2015, 4.2.1): context_t = sigmoid(f_beta(h)) * context_t, per channel;
* a dot-product query projected to the feature size when the LSTM state is not C wide;
* the output vector is h_t (``previous``) or h~_t = tanh(W_c [h_t; context_t]) (``current``),
  and p(y_t) = softmax(W_out dropout(.)).

Checkpoints written before the core existed name the LSTM's context (or fed-vector) weights
``input_context`` (``input_feed``); they load into ``input_extra``.
"""

from __future__ import annotations

from torch import nn

from captioning.nn.decoder_core import AttentionDecoderCore


class ShowAttendTellDecoder(AttentionDecoderCore):
    """LSTM decoder with soft attention over a grid of image features.

    Args:
        vocab_size: V.
        encoder_dim: C, channels of each grid cell.
        embed_dim, decoder_dim, attention_dim: E, D, A.
        attention: score function name (see :data:`captioning.nn.attention.SCORERS`) or ``"none"``
            (no attention: the mean feature is a fixed context at every step, the baseline).
        num_heads: > 1 for multi-head attention.
        gate: use the gating scalar beta_t (f_beta).
        dropout: before the output projection.
        max_positions: S, needed by the ``location`` score (grid H*W).
        fused: teacher forcing through the fused recurrence (same outputs and gradients as the
            plain loop, faster); False forces the plain loop.
        query: ``"previous"`` or ``"current"`` (:mod:`captioning.nn.decoder_core`).
        sentinel: adaptive attention with a visual sentinel.
        padding: how teacher forcing skips padding (``auto`` | ``shrink`` | ``mask``).
    """

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        embed_dim: int = 512,
        decoder_dim: int = 512,
        attention_dim: int = 512,
        attention: str = "additive",
        num_heads: int = 1,
        gate: bool = True,
        dropout: float = 0.5,
        max_positions: int | None = None,
        fused: bool = True,
        query: str = "previous",
        sentinel: bool = False,
        padding: str = "auto",
    ) -> None:
        super().__init__(
            vocab_size,
            encoder_dim,
            embed_dim,
            decoder_dim,
            attention_dim,
            attention,
            num_heads,
            dropout,
            max_positions,
            fused,
            query,
            sentinel,
            gate=gate,
            bridge="query",
            combine_previous=False,
            padding=padding,
        )
        self._register_load_state_dict_pre_hook(_rename_extra_input)

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.output.bias)
        nn.init.uniform_(self.output.weight, -0.1, 0.1)
        super().reset_parameters()


def _rename_extra_input(state_dict: dict, prefix: str, *_: object) -> None:
    """Earlier checkpoints: ``input_context`` / ``input_feed`` -> ``input_extra``."""
    for old in ("input_context.weight", "input_feed.weight"):
        if prefix + old in state_dict:
            state_dict[prefix + "input_extra.weight"] = state_dict.pop(prefix + old)
