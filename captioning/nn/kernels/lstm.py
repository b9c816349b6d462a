"""The LSTM update and its backward, one kernel each (see the package docstring).

Pre-activations are the sum of up to three (m, G) parts (the embedding part, the recurrent part
and the context/fed-vector part, each in its own dtype: bf16 GEMM outputs are read as they are),
G = 4D (5D with a sentinel gate), in the order i, f, g, o[, g_s]::

    i, f, o[, g_s] = sigmoid(.), g = tanh(.);  c = f c_prev + i g;  h = o tanh(c)  [s = g_s tanh(c)]

The forward stores the activations (what the backward needs), c, h (and h once more in the GEMM
dtype, so the next step's product needs no cast kernel) and s. Every tensor is (rows, width)
with its last dimension contiguous; rows may be strided (slices of larger buffers).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from captioning.nn.kernels import block, compute_dtype

_BLOCK_D = 128  # columns per program: a 512-wide state gives 4 programs per row


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _pre(x, r, z, k, D, m, HAS_R: tl.constexpr, HAS_Z: tl.constexpr, COMPUTE: tl.constexpr):
    """Pre-activation block k (i, f, g, o, g_s) of one row: the sum of its parts."""
    v = tl.load(x + k * D, mask=m, other=0.0).to(COMPUTE)
    if HAS_R:
        v += tl.load(r + k * D, mask=m, other=0.0).to(COMPUTE)
    if HAS_Z:
        v += tl.load(z + k * D, mask=m, other=0.0).to(COMPUTE)
    return v


@triton.jit
def _cell_forward(
    x_ptr,
    sx,
    r_ptr,
    sr,
    z_ptr,
    sz,
    c_ptr,
    sc,
    act_ptr,
    sa,
    c_out_ptr,
    sco,
    h_ptr,
    sh,
    hmm_ptr,
    shm,
    s_ptr,
    ss,
    D,
    HAS_R: tl.constexpr,
    HAS_Z: tl.constexpr,
    SENTINEL: tl.constexpr,
    WRITE_HMM: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < D
    x = x_ptr + row * sx + cols
    r = r_ptr + row * sr + cols
    z = z_ptr + row * sz + cols
    i = tl.sigmoid(_pre(x, r, z, 0, D, m, HAS_R, HAS_Z, COMPUTE))
    f = tl.sigmoid(_pre(x, r, z, 1, D, m, HAS_R, HAS_Z, COMPUTE))
    g = _tanh(_pre(x, r, z, 2, D, m, HAS_R, HAS_Z, COMPUTE))
    o = tl.sigmoid(_pre(x, r, z, 3, D, m, HAS_R, HAS_Z, COMPUTE))
    act = act_ptr + row * sa + cols
    tl.store(act, i.to(act_ptr.dtype.element_ty), mask=m)
    tl.store(act + D, f.to(act_ptr.dtype.element_ty), mask=m)
    tl.store(act + 2 * D, g.to(act_ptr.dtype.element_ty), mask=m)
    tl.store(act + 3 * D, o.to(act_ptr.dtype.element_ty), mask=m)
    c_prev = tl.load(c_ptr + row * sc + cols, mask=m, other=0.0).to(COMPUTE)
    c = f * c_prev + i * g
    tanh_c = _tanh(c)
    h = o * tanh_c
    tl.store(c_out_ptr + row * sco + cols, c.to(c_out_ptr.dtype.element_ty), mask=m)
    tl.store(h_ptr + row * sh + cols, h.to(h_ptr.dtype.element_ty), mask=m)
    if WRITE_HMM:
        tl.store(hmm_ptr + row * shm + cols, h.to(tl.float32).to(hmm_ptr.dtype.element_ty), mask=m)
    if SENTINEL:
        gs = tl.sigmoid(_pre(x, r, z, 4, D, m, HAS_R, HAS_Z, COMPUTE))
        tl.store(act + 4 * D, gs.to(act_ptr.dtype.element_ty), mask=m)
        tl.store(s_ptr + row * ss + cols, (gs * tanh_c).to(s_ptr.dtype.element_ty), mask=m)


@triton.jit
def _cell_backward(
    act_ptr,
    sa,
    c_ptr,
    sc,
    cp_ptr,
    scp,
    dh_ptr,
    sdh,
    dout_ptr,
    sdo,
    dc_ptr,
    sdc,
    ds_ptr,
    sds,
    dg_ptr,
    sdg,
    dcp_ptr,
    sdcp,
    D,
    HAS_DOUT: tl.constexpr,
    SENTINEL: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < D
    act = act_ptr + row * sa + cols
    i = tl.load(act, mask=m, other=0.0).to(COMPUTE)
    f = tl.load(act + D, mask=m, other=0.0).to(COMPUTE)
    g = tl.load(act + 2 * D, mask=m, other=0.0).to(COMPUTE)
    o = tl.load(act + 3 * D, mask=m, other=0.0).to(COMPUTE)
    c = tl.load(c_ptr + row * sc + cols, mask=m, other=0.0).to(COMPUTE)
    c_prev = tl.load(cp_ptr + row * scp + cols, mask=m, other=0.0).to(COMPUTE)
    dh = tl.load(dh_ptr + row * sdh + cols, mask=m, other=0.0).to(COMPUTE)
    if HAS_DOUT:
        dh += tl.load(dout_ptr + row * sdo + cols, mask=m, other=0.0).to(COMPUTE)
    dc = tl.load(dc_ptr + row * sdc + cols, mask=m, other=0.0).to(COMPUTE)
    tanh_c = _tanh(c)
    slope = 1.0 - tanh_c * tanh_c
    dc += dh * o * slope
    dg = dg_ptr + row * sdg + cols
    if SENTINEL:
        gs = tl.load(act + 4 * D, mask=m, other=0.0).to(COMPUTE)
        ds = tl.load(ds_ptr + row * sds + cols, mask=m, other=0.0).to(COMPUTE)
        dc += ds * gs * slope
        tl.store(dg + 4 * D, (ds * tanh_c * gs * (1.0 - gs)).to(dg_ptr.dtype.element_ty), mask=m)
    tl.store(dg, (dc * g * i * (1.0 - i)).to(dg_ptr.dtype.element_ty), mask=m)
    tl.store(dg + D, (dc * c_prev * f * (1.0 - f)).to(dg_ptr.dtype.element_ty), mask=m)
    tl.store(dg + 2 * D, (dc * i * (1.0 - g * g)).to(dg_ptr.dtype.element_ty), mask=m)
    tl.store(dg + 3 * D, (dh * tanh_c * o * (1.0 - o)).to(dg_ptr.dtype.element_ty), mask=m)
    tl.store(dcp_ptr + row * sdcp + cols, (dc * f).to(dcp_ptr.dtype.element_ty), mask=m)


def _rows(t: Tensor | None, like: Tensor) -> tuple[Tensor, int]:
    """(tensor, row stride) for a kernel argument; None -> a placeholder (its flag is off)."""
    if t is None:
        return like, 0
    if t.dim() != 2 or t.stride(-1) != 1:
        raise ValueError(
            f"kernel arguments are (rows, width) with contiguous rows, got shape {tuple(t.shape)} strides {t.stride()}"
        )
    return t, t.stride(0)


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
) -> None:
    """One LSTM update for m rows (module docstring): pre-activations x + r + z (each (m, G) or
    None but x), c (m, D) -> act (m, G), c_out, h_out (m, D), h_mm (m, D) in the GEMM dtype or
    None, s_out (m, D) the sentinel or None (then G = 4D)."""
    m, d = c.shape
    if m == 0:
        return
    sentinel = s_out is not None
    args = [_rows(t, x) for t in (x, r, z, c, act, c_out, h_out, h_mm, s_out)]
    grid = (m, triton.cdiv(d, min(block(d), _BLOCK_D)))
    _cell_forward[grid](
        *[v for pair in args for v in pair],
        d,
        HAS_R=r is not None,
        HAS_Z=z is not None,
        SENTINEL=sentinel,
        WRITE_HMM=h_mm is not None,
        COMPUTE=compute_dtype(c_out),
        BLOCK=min(block(d), _BLOCK_D),
    )


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
) -> None:
    """Gradients of one LSTM update for m rows: act (m, G), c and c_prev (m, D), dh (m, D) (+ d_out
    (m, D) when given), dc (m, D), ds (m, D) of the sentinel or None -> d_gates (m, G) (written
    into, e.g. a slice of a larger buffer) and dc_prev (m, D) (may be ``dc`` itself)."""
    m, d = c.shape
    if m == 0:
        return
    args = [_rows(t, act) for t in (act, c, c_prev, dh, d_out, dc, ds, d_gates, dc_prev)]
    grid = (m, triton.cdiv(d, min(block(d), _BLOCK_D)))
    _cell_backward[grid](
        *[v for pair in args for v in pair],
        d,
        HAS_DOUT=d_out is not None,
        SENTINEL=ds is not None,
        COMPUTE=compute_dtype(c),
        BLOCK=min(block(d), _BLOCK_D),
    )


__all__ = ["cell_backward", "cell_forward"]
