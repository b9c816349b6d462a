"""The text decoder: an attention LSTM decoder over the states of :mod:`captioning.nn.text_encoder`.

The same attention layer, step interface and teacher-forced recurrence as the image decoder
(:mod:`captioning.nn.decoder_core` documents them); what it adds:

* query styles under their text names: ``bahdanau`` (the previous state asks, the context
  enters the LSTM) and ``luong`` (the current state asks, input feeding);
* p(y_t) = softmax(W_out dropout(tanh(W_c [h_t; c_t]))) with either style;
* a dot-product score meets a state of another width by projecting the keys (values stay the
  encoder states, so the context keeps width C);
* ``attention="none"`` is Cho et al. 2014's "RNNenc": the encoder summary (last forward + first
  backward state) is the context at every step.
"""

from __future__ import annotations

from captioning.nn.decoder_core import AttentionDecoderCore

QUERY_STYLES = ("bahdanau", "luong")


class AttentionLSTMDecoder(AttentionDecoderCore):
    """LSTM decoder attending over encoder states before every word.

    Args:
        vocab_size: V (target vocabulary).
        encoder_dim: C, width of each encoder state (2H for :class:`captioning.nn.text_encoder.BiLSTMEncoder`).
        embed_dim, decoder_dim, attention_dim: E, D, A.
        attention: a score of :data:`captioning.nn.attention.SCORERS` (or alias) or ``"none"``.
        query: ``"bahdanau"`` (previous state) or ``"luong"`` (current state + input feeding).
        num_heads: > 1 for multi-head attention.
        dropout: on the vector fed to the output layer.
        max_positions: longest source (S incl. EOS); only the ``location`` score needs it.
        fused: teacher forcing through the fused recurrence; False: plain loop.
        sentinel: a language sentinel joins the attended source positions.
        padding: how teacher forcing skips padding (``auto`` | ``shrink`` | ``mask``).
    """

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        embed_dim: int = 128,
        decoder_dim: int = 256,
        attention_dim: int = 128,
        attention: str = "additive",
        query: str = "bahdanau",
        num_heads: int = 1,
        dropout: float = 0.2,
        max_positions: int | None = None,
        fused: bool = True,
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
            gate=False,
            bridge="keys",
            combine_previous=True,
            padding=padding,
        )
