"""The text encoder: a bidirectional LSTM over the source tokens (:class:`BiLSTMEncoder`).

Its states are what :class:`captioning.nn.text_decoder.AttentionLSTMDecoder` attends over, the
text counterpart of the image grid that :mod:`captioning.nn.encoders` produces.
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
    """Bidirectional LSTM over embedded source tokens; padding never enters the recurrence, so
    an item's states do not depend on how much it is padded.

    Two ways to get there, same states: packed sequences (``padded=False``, CPUs: no work on
    padding, but the lengths are read on the host), or padded ones (``padded=True``, GPUs: no
    host sync and fixed shapes, as CUDA graphs need): the forward direction runs over the padded
    rows (padding comes after a row's tokens, so it cannot reach them) and the backward direction
    over each row reversed in place (its tokens first, padding still last).

    Args:
        vocab_size: source vocabulary size.
        embed_dim: E; hidden_dim: H per direction (states are 2H wide, ``out_dim``).
        num_layers: stacked BiLSTM layers; dropout between layers and on the embeddings.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 128,
        hidden_dim: int = 128,
        num_layers: int = 1,
        dropout: float = 0.0,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(
            embed_dim,
            hidden_dim,
            num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.out_dim = 2 * hidden_dim

    def forward(self, source: Tensor, lengths: Tensor, padded: bool = False) -> EncoderOutput:
        """source (B, S) token ids, lengths (B,) real tokens per row (>= 1) -> :class:`EncoderOutput`.
        ``padded``: run on padded rows (no host sync; lengths are not checked) instead of packed ones."""
        if source.dim() != 2 or lengths.shape != source.shape[:1]:
            raise ValueError(
                f"source must be (B, S) with lengths (B,), got {tuple(source.shape)} and {tuple(lengths.shape)}"
            )
        emb = self.dropout(self.embedding(source))  # (B, S, E)
        if padded:
            return self._padded(emb, lengths)
        if bool((lengths < 1).any()) or bool((lengths > source.shape[1]).any()):
            raise ValueError(f"source lengths must be in 1..{source.shape[1]}, got {lengths.tolist()}")
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=source.shape[1])  # (B, S, 2H)
        summary = torch.cat([h[-2], h[-1]], dim=-1)  # top layer: forward final, backward final
        return EncoderOutput(states, length_mask(lengths, source.shape[1]), summary)

    def _padded(self, emb: Tensor, lengths: Tensor) -> EncoderOutput:
        """The packed result without packing (class docstring): emb (B, S, E), lengths (B,)."""
        b, s = emb.shape[:2]
        mask = length_mask(lengths, s)  # (B, S)
        pos = torch.arange(s, device=emb.device).unsqueeze(0)  # (1, S)
        # Row-wise reversal of the real tokens; padding stays in place. Its own inverse.
        rev = torch.where(mask, lengths.unsqueeze(1) - 1 - pos, pos)  # (B, S)
        last = (lengths - 1).clamp(min=0).view(b, 1, 1)
        lstm, x = self.lstm, emb
        finals = []
        for layer in range(lstm.num_layers):
            outs = []
            for suffix in ("", "_reverse"):
                weights = [
                    getattr(lstm, f"{name}_l{layer}{suffix}")
                    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                ]
                inp = x if not suffix else x.gather(1, rev.unsqueeze(-1).expand_as(x))
                zeros = x.new_zeros(1, b, lstm.hidden_size)
                out = torch.lstm(inp, (zeros, zeros), weights, True, 1, 0.0, self.training, False, True)[0]
                finals.append(out.gather(1, last.expand(b, 1, out.shape[-1])).squeeze(1))  # state at the last token
                outs.append(out if not suffix else out.gather(1, rev.unsqueeze(-1).expand_as(out)))
            x = torch.cat(outs, -1) * mask.unsqueeze(-1).to(emb.dtype)  # (B, S, 2H), exactly 0 at padding
            if layer < lstm.num_layers - 1 and lstm.dropout and self.training:
                x = nn.functional.dropout(x, lstm.dropout, True)
        return EncoderOutput(x, mask, torch.cat(finals[-2:], dim=-1))
