"""The additive (Bahdanau) score and its backward, one kernel each (see the package docstring).

The maths is :class:`captioning.nn.scores.AdditiveScorer`'s, in its sigmoid form: for query q
(projected, A wide) and prepared keys K (S, A),

    e_s = sum_a 2 v_a sigmoid(2 q_a + 2 K_sa) - sum_a v_a      (= v . tanh(q + K_s))

Each program scores a block of positions against one query, walking the A columns in chunks:
no (N, K, S, A) intermediate is written, and the keys are read once per query. The backward of
one step, for one query per item, is one pass over the keys: d q, and the sums over steps of
d(pre-activation) / v (N, S, A), of d_e * sigmoid (N, A) and of d_e (N) that the scorer's
``finish`` turns into the key and ``v`` gradients.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from captioning.nn.kernels import block, compute_dtype

_BLOCK_S = 32
_BLOCK_A = 64


@triton.jit
def _scores(
    q_ptr,
    sq,
    k_ptr,
    skn,
    sks,
    v_ptr,
    vsum_ptr,
    out_ptr,
    so,
    K,
    S,
    A,
    COMPUTE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_A: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # query row: item row // K
    pos = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    vs = pos < S
    keys = k_ptr + (row // K) * skn
    acc = tl.zeros([BLOCK_S], dtype=COMPUTE)
    for a0 in range(0, A, BLOCK_A):
        ca = a0 + tl.arange(0, BLOCK_A)
        va = ca < A
        q = tl.load(q_ptr + row * sq + ca, mask=va, other=0.0).to(COMPUTE)
        v = tl.load(v_ptr + ca, mask=va, other=0.0).to(COMPUTE)
        k = tl.load(keys + pos[:, None] * sks + ca[None, :], mask=vs[:, None] & va[None, :], other=0.0).to(COMPUTE)
        sig = tl.sigmoid(2.0 * q[None, :] + 2.0 * k)
        acc += tl.sum(sig * (2.0 * v)[None, :], 1)
    vsum = tl.load(vsum_ptr).to(COMPUTE)
    tl.store(out_ptr + row * so + pos, (acc - vsum).to(out_ptr.dtype.element_ty), mask=vs)


@triton.jit
def _backward(
    de_ptr,
    sde,
    q_ptr,
    sq,
    k_ptr,
    skn,
    sks,
    v_ptr,
    dpre_ptr,
    sdn,
    sds,
    dv_ptr,
    sdv,
    desum_ptr,
    dq_ptr,
    sdq,
    S,
    A,
    COMPUTE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_A: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    ab = tl.program_id(1)
    ca = ab * BLOCK_A + tl.arange(0, BLOCK_A)
    va = ca < A
    q = tl.load(q_ptr + n * sq + ca, mask=va, other=0.0).to(COMPUTE)
    dq = tl.zeros([BLOCK_A], dtype=COMPUTE)
    dvr = tl.zeros([BLOCK_A], dtype=COMPUTE)
    desum = tl.zeros([BLOCK_S], dtype=COMPUTE)
    for s0 in range(0, S, BLOCK_S):
        pos = s0 + tl.arange(0, BLOCK_S)
        vs = pos < S
        both = vs[:, None] & va[None, :]
        de = tl.load(de_ptr + n * sde + pos, mask=vs, other=0.0).to(COMPUTE)
        k = tl.load(k_ptr + n * skn + pos[:, None] * sks + ca[None, :], mask=both, other=0.0).to(COMPUTE)
        sig = tl.sigmoid(2.0 * q[None, :] + 2.0 * k)
        dvr += tl.sum(de[:, None] * sig, 0)
        slope = sig - sig * sig
        dq += tl.sum(de[:, None] * slope, 0)
        dp = dpre_ptr + n * sdn + pos[:, None] * sds + ca[None, :]
        old = tl.load(dp, mask=both, other=0.0).to(COMPUTE)
        tl.store(dp, (old + 4.0 * slope * de[:, None]).to(dpre_ptr.dtype.element_ty), mask=both)
        desum += de
    v = tl.load(v_ptr + ca, mask=va, other=0.0).to(COMPUTE)
    tl.store(dq_ptr + n * sdq + ca, (4.0 * v * dq).to(dq_ptr.dtype.element_ty), mask=va)
    dvp = dv_ptr + n * sdv + ca
    tl.store(dvp, (tl.load(dvp, mask=va, other=0.0).to(COMPUTE) + dvr).to(dv_ptr.dtype.element_ty), mask=va)
    first = ab == 0
    old_sum = tl.load(desum_ptr + n, mask=first, other=0.0).to(COMPUTE)
    tl.store(desum_ptr + n, (old_sum + tl.sum(desum, 0)).to(desum_ptr.dtype.element_ty), mask=first)


def _check_rows(*tensors: Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"kernel arguments need a contiguous last dimension, got strides {t.stride()}")


def scores(qp: Tensor, keys: Tensor, v: Tensor, out: Tensor) -> Tensor:
    """qp (N, K, A) queries, keys (N, S, A) prepared, v (A,) -> out (N, K, S) (written, returned)."""
    n, k, a = qp.shape
    s = keys.shape[1]
    if n * k == 0 or s == 0:
        return out
    q = qp.reshape(n * k, a)
    o = out.view(n * k, s)
    _check_rows(q, keys, o)
    vsum = v.sum().reshape(1)  # stays on the device: no host sync
    grid = (n * k, triton.cdiv(s, _BLOCK_S))
    _scores[grid](
        q,
        q.stride(0),
        keys,
        keys.stride(0),
        keys.stride(1),
        v,
        vsum,
        o,
        o.stride(0),
        k,
        s,
        a,
        COMPUTE=compute_dtype(out),
        BLOCK_S=_BLOCK_S,
        BLOCK_A=min(block(a), _BLOCK_A),
    )
    return out


def backward_step(
    d_scores: Tensor, qp: Tensor, keys: Tensor, v: Tensor, d_pre: Tensor, d_v_rows: Tensor, d_sums: Tensor, d_qp: Tensor
) -> None:
    """One step's backward for the first n items (one query each): d_scores (n, S), qp (n, A),
    keys (N, S, A) -> d_qp (n, A) written; adds into d_pre (N, S, A) (d pre-activation / v),
    d_v_rows (N, A) (d_e @ sigmoid) and d_sums (N,) (sum of d_e)."""
    n, a = qp.shape
    s = keys.shape[1]
    if n == 0:
        return
    _check_rows(d_scores, qp, keys, d_pre, d_v_rows, d_qp)
    bl = min(block(a), _BLOCK_A)
    _backward[(n, triton.cdiv(a, bl))](
        d_scores,
        d_scores.stride(0),
        qp,
        qp.stride(0),
        keys,
        keys.stride(0),
        keys.stride(1),
        v,
        d_pre,
        d_pre.stride(0),
        d_pre.stride(1),
        d_v_rows,
        d_v_rows.stride(0),
        d_sums,
        d_qp,
        d_qp.stride(0),
        s,
        a,
        COMPUTE=compute_dtype(d_pre),
        BLOCK_S=_BLOCK_S,
        BLOCK_A=bl,
    )


__all__ = ["backward_step", "scores"]
