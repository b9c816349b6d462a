"""The LSTM update of the fused recurrence and its backward, writing into the recurrence's
buffers: plain PyTorch, or one fused kernel each (:mod:`captioning.nn.kernels.lstm`) when the
recurrence runs them. Same maths as :func:`captioning.nn.recurrence.reference.lstm_cell`."""

from __future__ import annotations

import torch
from torch import Tensor


def cell_forward(
    x: Tensor,
    r: Tensor | None,
    z: Tensor | None,
    c: Tensor,
    act: Tensor,
    c_out: Tensor,
    h_out: Tensor,
    h_mm: Tensor | None,
    s_out: Tensor | None,
    kernels: bool,
) -> None:
    """Pre-activations x + r + z (m, G) (r, z may be None), c (m, D) -> act (m, G) the
    activations (sigmoid, tanh for the g block), c_out, h_out (m, D), h_mm (m, D) h once more in
    the GEMM dtype (or None), s_out (m, D) the sentinel (or None: then G = 4D)."""
    if kernels:
        from captioning.nn.kernels.lstm import cell_forward as fused

        fused(x, r, z, c, act, c_out, h_out, h_mm, s_out)
        return
    d = c.shape[-1]
    gates = x.to(act.dtype)
    if r is not None:
        gates = gates + r
    if z is not None:
        gates = gates + z
    torch.sigmoid(gates, out=act)
    act[:, 2 * d : 3 * d] = torch.tanh(gates[:, 2 * d : 3 * d])
    i, f, g, o = act[:, : 4 * d].chunk(4, dim=1)
    torch.mul(f, c, out=c_out)
    c_out.addcmul_(i, g)
    tanh_c = torch.tanh(c_out)
    torch.mul(o, tanh_c, out=h_out)
    if s_out is not None:
        torch.mul(act[:, 4 * d :], tanh_c, out=s_out)
    if h_mm is not None:
        h_mm.copy_(h_out)


def cell_backward(
    act: Tensor,
    c: Tensor,
    c_prev: Tensor,
    dh: Tensor,
    d_out: Tensor | None,
    dc: Tensor,
    ds: Tensor | None,
    d_gates: Tensor,
    dc_prev: Tensor,
    kernels: bool,
) -> None:
    """act (m, G), c and c_prev (m, D); dh (m, D) (+ d_out when given), dc (m, D), ds (m, D) or
    None -> d_gates (m, G) (written into) and dc_prev (m, D) (may be ``dc`` itself)."""
    if kernels:
        from captioning.nn.kernels.lstm import cell_backward as fused

        fused(act, c, c_prev, dh, d_out, dc, ds, d_gates, dc_prev)
        return
    d = c.shape[-1]
    if d_out is not None:
        dh = dh + d_out
    i, f, g, o = act[:, : 4 * d].chunk(4, dim=1)
    tanh_c = torch.tanh(c)
    slope = 1 - tanh_c * tanh_c
    dc = dc + dh * o * slope
    if ds is not None:  # s = g_s tanh(c)
        g_s = act[:, 4 * d :]
        dc = dc + ds * g_s * slope
        d_gates[:, 4 * d :] = ds * tanh_c * g_s * (1 - g_s)
    d_gates[:, :d] = dc * g * i * (1 - i)
    d_gates[:, d : 2 * d] = dc * c_prev * f * (1 - f)
    d_gates[:, 2 * d : 3 * d] = dc * i * (1 - g * g)
    d_gates[:, 3 * d : 4 * d] = dh * tanh_c * o * (1 - o)
    torch.mul(dc, f, out=dc_prev)
