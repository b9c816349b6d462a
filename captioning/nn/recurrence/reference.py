"""The plain (autograd) maths both decoders step through: the reference the fused recurrence is
tested against, and what search runs one step at a time."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def lstm_cell(gates: Tensor, c: Tensor, sentinel: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The LSTM update: gates (N, 4D) pre-activations i, f, g, o (+ g_s (N, D) with the
    sentinel), c (N, D) -> h, c (N, D) and the sentinel s = sigmoid(g_s) * tanh(c) (N, D) or
    None (Lu et al. 2017)."""
    if sentinel:
        i, f, g, o, g_s = gates.chunk(5, dim=-1)
    else:
        i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    tanh_c = torch.tanh(c)
    return torch.sigmoid(o) * tanh_c, c, torch.sigmoid(g_s) * tanh_c if sentinel else None


def plain_steps(
    advance: Callable, x_gates: Tensor, state: object, memory: object, sentinel: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Teacher forcing step by step through autograd: ``advance(x_gates[:, t], state, memory)
    -> (out, alpha, beta, state)`` for every step t of x_gates (B, T, G) -> outputs (B, T, D),
    alphas (B, T, S), betas (B, T) or None."""
    outs, alphas, betas = [], [], []
    for t in range(x_gates.shape[1]):
        out, alpha, beta, state = advance(x_gates[:, t], state, memory)
        outs.append(out)
        alphas.append(alpha)
        betas.append(beta)
    return torch.stack(outs, 1), torch.stack(alphas, 1), torch.stack(betas, 1) if sentinel else None
