"""Masked softmax + weighted sum of the values (+ the f_beta gate), and the backward pieces of
one attention step, one kernel each (see the package docstring).

One query per item (heads flattened into the items): scores e (n, S), mask (n, S) (True = may
attend) -> alpha = masked softmax (masked positions exactly 0, an all-masked row all 0, as
:func:`captioning.nn.attention.masked_softmax`), context = alpha @ values (n, dv), and with a
gate z = sigmoid(gate_pre) * context. Each program reads its own columns of the values once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from captioning.nn.kernels import block, compute_dtype

_BLOCK_DV = 128  # value columns per program
_CHUNK_S = 32  # positions per inner iteration


@triton.jit
def _weights(e_ptr, mask_ptr, pos, valid, mx, total, NEG, HAS_MASK: tl.constexpr, COMPUTE: tl.constexpr):
    """Softmax weights of positions ``pos`` given the row's max and sum of exponentials."""
    e = tl.load(e_ptr + pos, mask=valid, other=0.0).to(COMPUTE)
    if HAS_MASK:
        ok = tl.load(mask_ptr + pos, mask=valid, other=0) != 0
        e = tl.where(ok, e, NEG)
    a = tl.exp(e - mx) / total
    if HAS_MASK:
        a = tl.where(ok, a, 0.0)
    return tl.where(valid, a, 0.0)


@triton.jit
def _softmax_context(
    e_ptr,
    se,
    mask_ptr,
    smk,
    v_ptr,
    svn,
    svs,
    a_ptr,
    sa,
    ctx_ptr,
    sc,
    gp_ptr,
    sg,
    z_ptr,
    sz,
    S,
    DV,
    NEG,
    HAS_MASK: tl.constexpr,
    GATE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHUNK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    row_e = e_ptr + n * se
    row_m = mask_ptr + n * smk
    pos = tl.arange(0, BLOCK_S)
    valid = pos < S
    e = tl.load(row_e + pos, mask=valid, other=0.0).to(COMPUTE)
    if HAS_MASK:
        ok = tl.load(row_m + pos, mask=valid, other=0) != 0
        e = tl.where(ok, e, NEG)
    e = tl.where(valid, e, float("-inf"))
    mx = tl.max(e, 0)
    total = tl.sum(tl.exp(e - mx), 0)
    cols = blk * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mc = cols < DV
    acc = tl.zeros([BLOCK_DV], dtype=COMPUTE)
    for s0 in range(0, S, CHUNK_S):
        p = s0 + tl.arange(0, CHUNK_S)
        vp = p < S
        a = _weights(row_e, row_m, p, vp, mx, total, NEG, HAS_MASK, COMPUTE)
        tl.store(a_ptr + n * sa + p, a.to(a_ptr.dtype.element_ty), mask=vp & (blk == 0))
        v = tl.load(v_ptr + n * svn + p[:, None] * svs + cols[None, :], mask=vp[:, None] & mc[None, :], other=0.0).to(
            COMPUTE
        )
        acc += tl.sum(a[:, None] * v, 0)
    tl.store(ctx_ptr + n * sc + cols, acc.to(ctx_ptr.dtype.element_ty), mask=mc)
    if GATE:
        gate = tl.sigmoid(tl.load(gp_ptr + n * sg + cols, mask=mc, other=0.0).to(COMPUTE))
        tl.store(z_ptr + n * sz + cols, (gate * acc).to(z_ptr.dtype.element_ty), mask=mc)


@triton.jit
def _softmax_backward(
    a_ptr,
    sa,
    dw_ptr,
    sdw,
    da_ptr,
    sda,
    de_ptr,
    sde,
    S,
    HEADS,
    INV_HEADS,
    HAS_DA: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    pos = tl.arange(0, BLOCK_S)
    valid = pos < S
    a = tl.load(a_ptr + n * sa + pos, mask=valid, other=0.0).to(COMPUTE)
    g = tl.load(dw_ptr + n * sdw + pos, mask=valid, other=0.0).to(COMPUTE)
    if HAS_DA:  # the gradient of the heads' average alpha: 1/H of it for each head
        g += tl.load(da_ptr + (n // HEADS) * sda + pos, mask=valid, other=0.0).to(COMPUTE) * INV_HEADS
    dot = tl.sum(a * g, 0)
    tl.store(de_ptr + n * sde + pos, (a * (g - dot)).to(de_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _gate_backward(
    dz_ptr,
    sdz,
    dx_ptr,
    sdx,
    ctx_ptr,
    sc,
    gp_ptr,
    sg,
    dctx_ptr,
    sdc,
    dgp_ptr,
    sdg,
    C,
    HAS_DX: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < C
    dz = tl.load(dz_ptr + row * sdz + cols, mask=m, other=0.0).to(COMPUTE)
    if HAS_DX:
        dz += tl.load(dx_ptr + row * sdx + cols, mask=m, other=0.0).to(COMPUTE)
    gate = tl.sigmoid(tl.load(gp_ptr + row * sg + cols, mask=m, other=0.0).to(COMPUTE))
    ctx = tl.load(ctx_ptr + row * sc + cols, mask=m, other=0.0).to(COMPUTE)
    tl.store(dctx_ptr + row * sdc + cols, (dz * gate).to(dctx_ptr.dtype.element_ty), mask=m)
    tl.store(dgp_ptr + row * sdg + cols, (dz * ctx * gate * (1.0 - gate)).to(dgp_ptr.dtype.element_ty), mask=m)


def _row_stride(t: Tensor | None) -> int:
    if t is None:
        return 0
    if t.stride(-1) != 1:
        raise ValueError(f"kernel arguments need contiguous rows, got strides {t.stride()}")
    return t.stride(0)


def softmax_context(
    e: Tensor,
    mask: Tensor | None,
    values: Tensor,
    alpha: Tensor,
    context: Tensor,
    gate_pre: Tensor | None = None,
    z: Tensor | None = None,
) -> None:
    """e (n, S) scores, mask (n, S) bool or None, values (n, S, dv) -> writes alpha (n, S) and
    context (n, dv); with ``gate_pre`` (n, dv) also z = sigmoid(gate_pre) * context (n, dv)."""
    n, s = e.shape
    dv = values.shape[-1]
    if n == 0:
        return
    if values.stride(-1) != 1:
        raise ValueError("values need contiguous rows")
    neg = torch.finfo(torch.float64 if context.dtype == torch.float64 else torch.float32).min
    grid = (n, triton.cdiv(dv, _BLOCK_DV))
    _softmax_context[grid](
        e,
        _row_stride(e),
        e if mask is None else mask,
        _row_stride(mask),
        values,
        values.stride(0),
        values.stride(1),
        alpha,
        _row_stride(alpha),
        context,
        _row_stride(context),
        context if gate_pre is None else gate_pre,
        _row_stride(gate_pre),
        context if z is None else z,
        _row_stride(z),
        s,
        dv,
        neg,
        HAS_MASK=mask is not None,
        GATE=gate_pre is not None,
        COMPUTE=compute_dtype(context),
        BLOCK_S=block(s, 1 << 15),
        CHUNK_S=_CHUNK_S,
        BLOCK_DV=_BLOCK_DV,
    )


def softmax_backward(alpha: Tensor, d_weights: Tensor, d_alpha: Tensor | None, heads: int, d_scores: Tensor) -> None:
    """alpha (n, S) softmax weights, d_weights (n, S) their gradient, d_alpha (n / heads, S) the
    gradient of the heads' average (or None) -> d_scores (n, S) (exactly 0 where alpha is 0)."""
    n, s = alpha.shape
    if n == 0:
        return
    _softmax_backward[(n,)](
        alpha,
        _row_stride(alpha),
        d_weights,
        _row_stride(d_weights),
        alpha if d_alpha is None else d_alpha,
        _row_stride(d_alpha),
        d_scores,
        _row_stride(d_scores),
        s,
        heads,
        1.0 / heads,
        HAS_DA=d_alpha is not None,
        COMPUTE=compute_dtype(d_scores),
        BLOCK_S=block(s, 1 << 15),
    )


def gate_backward(
    dz: Tensor, d_extra: Tensor | None, context: Tensor, gate_pre: Tensor, d_context: Tensor, d_gate_pre: Tensor
) -> None:
    """z = sigmoid(gate_pre) * context: dz (m, C) (+ d_extra (m, C)) -> d_context (m, C) and
    d_gate_pre (m, C) (written into, e.g. a slice of a larger buffer)."""
    m, c = context.shape
    if m == 0:
        return
    bl = min(block(c), _BLOCK_DV)
    _gate_backward[(m, triton.cdiv(c, bl))](
        dz,
        _row_stride(dz),
        dz if d_extra is None else d_extra,
        _row_stride(d_extra),
        context,
        _row_stride(context),
        gate_pre,
        _row_stride(gate_pre),
        d_context,
        _row_stride(d_context),
        d_gate_pre,
        _row_stride(d_gate_pre),
        c,
        HAS_DX=d_extra is not None,
        COMPUTE=compute_dtype(d_context),
        BLOCK=bl,
    )


__all__ = ["gate_backward", "softmax_backward", "softmax_context"]
