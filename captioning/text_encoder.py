"""The text encoder: a bidirectional LSTM over the source tokens (:class:`BiLSTMEncoder`).

Its states are what :class:`captioning.text_decoder.AttentionLSTMDecoder` attends over, the
text counterpart of the image grid that :mod:`captioning.encoders` produces.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class EncoderOutput(NamedTuple):
    """states (B, S, 2H) (exactly 0 at padding); mask (B, S) True = real token; summary (B, 2H)
    = [last forward state; first backward state] of the top layer."""

    states: Tensor
    mask: Tensor
    summary: Tensor


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """lengths (B,) -> (B, max_len) bool, True for positions < length."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class BiLSTMEncoder(nn.Module):
    """Bidirectional LSTM over embedded source tokens, run on packed sequences so padding
    never enters the recurrence: an item's states do not depend on how much it is padded.

    Args:
        vocab_size: source vocabulary size.
        embed_dim: E; hidden_dim: H per direction (states are 2H wide, ``out_dim``).
        num_layers: stacked BiLSTM layers; dropout between layers and on the embeddings.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 128, hidden_dim: int = 128, num_layers: int = 1,
                 dropout: float = 0.0, pad_id: int = 0) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers, batch_first=True, bidirectional=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.out_dim = 2 * hidden_dim

    def forward(self, source: Tensor, lengths: Tensor) -> EncoderOutput:
        """source (B, S) token ids, lengths (B,) real tokens per row (>= 1) -> :class:`EncoderOutput`."""
        if source.dim() != 2 or lengths.shape != source.shape[:1]:
            raise ValueError(f"source must be (B, S) with lengths (B,), got {tuple(source.shape)} "
                             f"and {tuple(lengths.shape)}")
        if bool((lengths < 1).any()) or bool((lengths > source.shape[1]).any()):
            raise ValueError(f"source lengths must be in 1..{source.shape[1]}, got {lengths.tolist()}")
        emb = self.dropout(self.embedding(source))  # (B, S, E)
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=source.shape[1])  # (B, S, 2H)
        summary = torch.cat([h[-2], h[-1]], dim=-1)  # top layer: forward final, backward final
        return EncoderOutput(states, length_mask(lengths, source.shape[1]), summary)
