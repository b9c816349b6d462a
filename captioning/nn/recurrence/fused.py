"""The teacher-forced attention-LSTM recurrence as one autograd node with a hand-written backward.
(Over 400 lines on purpose: the forward and the backward share one buffer layout and must be
read side by side; their per-step pieces are already in .attention_steps and .cell.)

Autograd through the T-step Python loop spends much of a training step on bookkeeping: every
weight gradient becomes T thin products (inner size B), each added into a full-size gradient
buffer, and every intermediate of every step is kept alive. Here the forward runs the same
maths with no graph and keeps only what the backward needs; the backward walks the steps in
reverse computing only what depends on the recurrence, then forms every weight gradient as ONE
product over all B*T cells.

Per step (h = h_{t-1}, c = c_{t-1}; every matrix that multiplies the state stacked in W_h):

    query "previous" (Show-Attend-Tell):
        P_t = [r | g | q] = h @ W_h^T + b   recurrent gates, f_beta gate (C), projected query (H*Q)
        ctx, alpha[, beta] = attention(q [, sentinel s_{t-1}])
        z = sigmoid(g) * ctx              (z = ctx without the gate)
        gates = x_t + r + z @ W_x^T       x_t: embedding part, one GEMM for all steps outside
        i, f, o[, g_s] = sigmoid(.), g~ = tanh(.);  c = f c + i g~;  h = o tanh(c)  [s = g_s tanh(c)]
        output h
    query "current" (Luong, input feeding): gates = x_t + r_{t-1} + feed_{t-1} @ W_x^T; the LSTM
        step; then P_t = [r | g | q | u] = h_t @ W_h^T + b, attention with q (and s_t), z as above,
        feed_t = tanh(u + z @ W_u^T); output feed_t.

Buffers are time-major, (T, B, .): step t's rows are contiguous, so products write straight into
them. Padding follows a :class:`~captioning.nn.recurrence.plan.Schedule`: rows shrink as
sequences end (CPU), or every row runs and padding is masked (GPU: no host sync, fixed shapes).
GEMMs run in ``matmul_dtype`` (e.g. bf16 under autocast, weights cast once per call); states,
softmax and nonlinearities stay in float32 (float64 in tests). On CUDA the LSTM update, the
softmax + context + gate and their backward run as fused kernels (:mod:`captioning.nn.kernels`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from captioning.nn import kernels
from captioning.nn.attention import PreparedMemory
from captioning.nn.recurrence.attention_steps import AttentionSteps, mm
from captioning.nn.recurrence.cell import cell_backward, cell_forward
from captioning.nn.recurrence.plan import (
    RecurrencePlan,
    RecurrenceWeights,
    Schedule,
    make_schedule,
    real_cells,
    resolve_padding,
)


class RecurrenceOutput(NamedTuple):
    """out (B, T, D): h_t ("previous") or feed_t ("current"); alphas (B, T, S) image attention
    (over the image alone when a sentinel takes part); betas (B, T) sentinel weight or None;
    contexts (B, T, C) the (gated) context of every step. Padding cells are 0."""

    out: Tensor
    alphas: Tensor
    betas: Tensor | None
    contexts: Tensor


def fused_recurrence(
    plan: RecurrencePlan,
    xg: Tensor,
    memory: PreparedMemory,
    h0: Tensor,
    c0: Tensor,
    s0: Tensor | None,
    weights: RecurrenceWeights,
    score_params: tuple = (),
    sentinel_params: tuple = (),
    steps: Tensor | None = None,
    padding: str = "auto",
) -> RecurrenceOutput:
    """Run the recurrence (module docstring) as one autograd node.

    Args:
        xg: (B, T, G) embedding part of the gates (G = 4D, 5D with a sentinel gate).
        memory: the layer's prepared keys/values/mask. h0, c0: (B, D). s0: (B, D) initial
            sentinel ("previous" with a sentinel) or None.
        weights: the stacked matrices (:class:`RecurrenceWeights`).
        score_params: ``plan.scorer.score_parameters()``; sentinel_params: every parameter
            ``plan.sentinel_rows`` and the scorer's ``scores_paired`` may read.
        steps: (B,) how many of the T steps count for each row (teacher forcing: its real target
            tokens), or None for all. A row's later steps are padding: outputs there are 0 and
            gradients are those of the full loop whenever the loss ignores padding.
        padding: how padding is skipped: "shrink", "mask" or "auto" (see
            :class:`~captioning.nn.recurrence.plan.Schedule`).
    """
    sched = make_schedule(steps, xg.shape[0], xg.shape[1], resolve_padding(padding, xg.device))
    keys, values, mask = memory.keys, memory.values, memory.mask
    order = sched.order
    if order is not None:  # the recurrence wants the rows that run longest first
        xg, keys, values, h0, c0 = (x.index_select(0, order) for x in (xg, keys, values, h0, c0))
        mask, s0 = (None if x is None else x.index_select(0, order) for x in (mask, s0))
    out, alphas, betas, contexts = _Recurrence.apply(
        plan,
        sched,
        len(score_params),
        kernels.usable(xg),
        xg,
        keys,
        values,
        mask,
        h0,
        c0,
        s0,
        *weights,
        *score_params,
        *sentinel_params,
    )
    if order is not None:
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        out, alphas, contexts = (x.index_select(0, back) for x in (out, alphas, contexts))
        betas = betas.index_select(0, back) if betas.numel() else betas
    return RecurrenceOutput(out, alphas, betas if plan.sentinel_rows is not None else None, contexts)


def _layout(plan: RecurrencePlan, rows: int, g: int, c_ctx: int, d: int) -> tuple[slice, slice, slice]:
    """Column blocks of P after the recurrent ones: gate, query, combine ("current")."""
    gate_end = g + (c_ctx if plan.gate else 0)
    q_end = rows - (d if plan.query == "current" else 0)
    return slice(g, gate_end), slice(gate_end, q_end), slice(q_end, rows)


def _gemm(out: Tensor, bias: Tensor | None, a: Tensor, b: Tensor) -> None:
    """out = a @ b (+ bias), written in place (a row block of a time-major buffer)."""
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


def _rows(x: Tensor, m: int) -> Tensor:
    """A carried gradient (k, D) -> (m, D): rows that join at their last step start from zero."""
    return x if x.shape[0] >= m else torch.cat([x, x.new_zeros(m - x.shape[0], x.shape[1])])


def _flat(x: Tensor, real: Tensor | None) -> Tensor:
    """(T, B, X) -> (T*B, X), or only the ``real`` cells' rows (padding adds nothing to a gradient)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if real is None else flat.index_select(0, real)


class _Recurrence(torch.autograd.Function):
    """The time loop as one autograd node; see :func:`fused_recurrence` for the inputs."""

    @staticmethod
    def forward(
        ctx,
        plan: RecurrencePlan,
        sched: Schedule,
        n_score: int,
        kern: bool,
        xg: Tensor,
        keys: Tensor,
        values: Tensor,
        mask: Tensor | None,
        h0: Tensor,
        c0: Tensor,
        s0: Tensor | None,
        w_h: Tensor,
        b_h: Tensor | None,
        w_x: Tensor,
        w_u: Tensor | None,
        out_w: Tensor | None,
        out_b: Tensor | None,
        *params: Tensor,
    ):
        ctx.set_materialize_grads(False)
        with torch.autocast(xg.device.type, enabled=False):  # dtypes are chosen explicitly
            dtype = torch.promote_types(xg.dtype, torch.float32)  # states and elementwise maths
            mmt = plan.matmul_dtype or dtype
            b, steps, g = xg.shape
            d = h0.shape[-1]
            current, sentinel = plan.query == "current", plan.sentinel_rows is not None
            att = AttentionSteps(plan, keys, values, mask, steps, dtype, mmt, out_w, out_b, sched.padded, kern)
            c_ctx = values.shape[-1] if out_w is None else out_w.shape[0]
            gs, qs, us = _layout(plan, w_h.shape[0], g, c_ctx, d)
            w_h_t, w_x_t = w_h.to(mmt).t(), w_x.to(mmt).t()  # cast once, not per step
            nothing = xg.new_empty(0)  # stands for the buffers a variant does not use
            w_u_t = w_u.to(mmt).t() if w_u is not None else nothing
            bias = None if b_h is None else b_h.to(mmt)
            x_t = (xg if kern else xg.to(dtype)).transpose(0, 1)  # (T, B, G)
            # Cells a row sits out (padding) are not computed. Those returned (outputs, contexts)
            # must be 0 there, and so must the sentinel's inputs (its parameter gradient reads
            # every cell of s_used and of the queries in P); the others are read at real cells only.
            new, out_new = xg.new_empty, (xg.new_zeros if sched.padded else xg.new_empty)
            p_all = (out_new if sentinel else new)(steps, b, w_h.shape[0], dtype=mmt)  # products on the state
            hidden, cells = (new if current else out_new)(steps, b, d, dtype=dtype), new(steps, b, d, dtype=dtype)
            acts = new(steps, b, g, dtype=dtype)
            z_all = out_new(steps, b, c_ctx, dtype=mmt)  # the (gated) contexts
            ctx_all = new(steps, b, c_ctx, dtype=dtype) if plan.gate else nothing
            feeds = out_new(steps, b, d, dtype=dtype) if current else nothing
            s_used = out_new(steps, b, d, dtype=dtype) if sentinel else nothing
            h_mm = xg.new_empty(b, d, dtype=mmt) if mmt != dtype else None  # h in the GEMM dtype
            h0f, c0f = h0.to(dtype), c0.to(dtype)
            if sentinel and not current:
                assert s0 is not None, "the previous-state query with a sentinel starts from s_0"
                s_used[0] = s0.to(dtype)
            s_spare = xg.new_empty(b, d, dtype=dtype) if sentinel and not current else nothing
            p_init = torch.mm(h0.to(mmt), w_h_t[:, :g]) if current else nothing  # r of step 0
            active = sched.active or (b,) * steps  # rows taking part in each step: the first ones
            for t in range(steps):
                m = active[t]
                if m == 0:
                    break
                c_prev = c0f[:m] if t == 0 else cells[t - 1, :m]
                hm = None if h_mm is None else h_mm[:m]
                ctx_out = ctx_all[t, :m] if plan.gate else z_all[t, :m]
                gate_pre = p_all[t, :m, gs] if plan.gate else None
                if current:  # LSTM first, then attend with h_t
                    r = p_init[:m] if t == 0 else p_all[t - 1, :m, :g]
                    zf = None if t == 0 else torch.mm(feeds[t - 1, :m].to(mmt), w_x_t)
                    cell_forward(
                        x_t[t, :m],
                        r,
                        zf,
                        c_prev,
                        acts[t, :m],
                        cells[t, :m],
                        hidden[t, :m],
                        hm,
                        s_used[t, :m] if sentinel else None,
                        kern,
                    )
                    _gemm(p_all[t, :m], bias, hidden[t, :m] if hm is None else hm, w_h_t)
                    att.forward(
                        t, p_all[t, :m, qs], s_used[t, :m] if sentinel else None, ctx_out, gate_pre, z_all[t, :m]
                    )
                    feeds[t, :m] = torch.tanh(p_all[t, :m, us].to(dtype) + mm(z_all[t, :m], w_u_t, dtype))
                else:
                    if t == 0:
                        h_in = h0f[:m] if h_mm is None else h0[:m].to(mmt)
                    else:
                        h_in = hidden[t - 1, :m] if hm is None else hm
                    _gemm(p_all[t, :m], bias, h_in, w_h_t)
                    att.forward(
                        t, p_all[t, :m, qs], s_used[t, :m] if sentinel else None, ctx_out, gate_pre, z_all[t, :m]
                    )
                    s_next = None
                    if sentinel:
                        s_next = s_used[t + 1, :m] if t + 1 < steps else s_spare[:m]
                    cell_forward(
                        x_t[t, :m],
                        p_all[t, :m, :g],
                        torch.mm(z_all[t, :m], w_x_t),
                        c_prev,
                        acts[t, :m],
                        cells[t, :m],
                        hidden[t, :m],
                        hm,
                        s_next,
                        kern,
                    )
            out, alphas, betas, contexts = (feeds if current else hidden), att.alphas, att.betas, z_all
            if sched.real is not None:  # padding cells (computed, as every row runs) -> 0
                real = sched.real.to(dtype)
                out, alphas, contexts = (x * real.unsqueeze(-1).to(x.dtype) for x in (out, alphas, contexts))
                betas = betas * real if sentinel else betas
        ctx.save_for_backward(
            keys, values, h0, c0, w_h, b_h, w_x, w_u, hidden, cells, acts, p_all, z_all, ctx_all, feeds, s_used
        )
        ctx.plan, ctx.sched, ctx.att, ctx.mm, ctx.kern, ctx.n_score = plan, sched, att, mmt, kern, n_score
        ctx.xg_dtype, ctx.params, ctx.active = xg.dtype, params, active
        ctx.dtypes = (h0.dtype, c0.dtype, None if s0 is None else s0.dtype)
        return (
            out.transpose(0, 1).to(xg.dtype),
            alphas.transpose(0, 1),
            betas.transpose(0, 1) if sentinel else betas,
            contexts.transpose(0, 1).to(xg.dtype),
        )

    @staticmethod
    def backward(ctx, d_out, d_alphas, d_betas, d_contexts):
        with torch.autocast(ctx.saved_tensors[4].device.type, enabled=False):
            return (None, None, None, None, *_backward(ctx, d_out, d_alphas, d_betas, d_contexts))


def _backward(ctx, d_out, d_alphas, d_betas, d_contexts) -> tuple:
    """Reverse-time loop; one gradient (or None) per forward input from ``xg`` on."""
    (keys, values, h0, c0, w_h, b_h, w_x, w_u, hidden, cells, acts, p_all, z_all, ctx_all, feeds, s_used) = (
        ctx.saved_tensors
    )
    plan, sched, att, mmt, kern = ctx.plan, ctx.sched, ctx.att, ctx.mm, ctx.kern
    dtype = hidden.dtype
    steps, b, d = hidden.shape
    g, c_ctx = acts.shape[-1], z_all.shape[-1]
    current, sentinel = plan.query == "current", plan.sentinel_rows is not None
    gs, qs, us = _layout(plan, w_h.shape[0], g, c_ctx, d)
    w_h_mm, w_x_mm = w_h.to(mmt), w_x.to(mmt)
    w_u_mm = w_u.to(mmt) if w_u is not None else w_h_mm.new_empty(0)
    real = None if sched.real is None else sched.real.to(dtype)  # (T, B): incoming gradients of padding -> 0

    def time_major(x: Tensor | None) -> Tensor | None:
        if x is None or x.numel() == 0:
            return None
        x = x.transpose(0, 1).to(dtype)
        return x if real is None else x * real.view(*real.shape, *[1] * (x.dim() - 2))

    d_out, d_alphas, d_betas, d_contexts = (time_major(x) for x in (d_out, d_alphas, d_betas, d_contexts))
    need_values = ctx.needs_input_grad[6]
    att.begin_backward(need_values)
    # Row t of d_p: d of [r | g | q | u] of the GEMM that feeds step t's gates ("previous": that
    # of step t itself; "current": that of step t-1's state, row 0 = the initial state). Zeros
    # where a row sat out a step (padding), so the weight gradients below can take all rows.
    padded = sched.padded
    d_p = (hidden.new_zeros if current or padded else hidden.new_empty)(
        steps + int(current), b, w_h.shape[0], dtype=mmt
    )
    # Carried gradients have a row per row still going: rows join (with zeros) at their last step.
    dh, dc = hidden.new_zeros(0, d), hidden.new_zeros(0, d)
    ds = hidden.new_zeros(0, d) if sentinel and not current else None
    active = ctx.active
    as_state = (lambda x: x) if kern else (lambda x: x.to(dtype))  # the kernels read GEMM outputs as they are

    def attend_backward(t: int, row: int, dz: Tensor) -> Tensor | None:
        m = dz.shape[0]
        extra = None if d_contexts is None else d_contexts[t, :m]
        d_context = att.context_grad_buffer(t, m)
        if plan.gate:
            gate_pre = p_all[t, :m, gs]
            if kern:
                from captioning.nn.kernels.attention import gate_backward

                gate_backward(dz, extra, ctx_all[t, :m], gate_pre, d_context, d_p[row, :m, gs])
            else:
                dz = dz.to(dtype) if extra is None else dz.to(dtype) + extra
                gate = torch.sigmoid(gate_pre.to(dtype))
                torch.mul(dz, gate, out=d_context)
                d_p[row, :m, gs] = dz * ctx_all[t, :m] * gate * (1 - gate)
        else:
            d_context.copy_(dz if extra is None else dz.to(dtype) + extra)
        d_qp, d_s = att.backward(
            t,
            p_all[t, :m, qs],
            d_context,
            None if d_alphas is None else d_alphas[t, :m],
            None if d_betas is None else d_betas[t, :m],
            s_used[t, :m] if sentinel else None,
        )
        d_p[row, :m, qs] = d_qp
        return d_s

    c0f = c0.to(dtype)
    for t in reversed(range(steps)):
        m = active[t]
        if m == 0:
            continue
        c_prev = cells[t - 1, :m] if t > 0 else c0f[:m]
        dc = _rows(dc, m)
        if current:
            d_feed = mm(d_p[t + 1, :m, :g], w_x_mm, dtype)  # feed_t enters step t+1's gates
            if d_out is not None:
                d_feed = d_feed + d_out[t, :m]
            feed = feeds[t, :m]
            d_u = d_feed - d_feed * feed * feed
            d_p[t + 1, :m, us] = d_u
            d_s = attend_backward(t, t + 1, torch.mm(d_u.to(mmt), w_u_mm))
            dh = as_state(torch.mm(d_p[t + 1, :m], w_h_mm))
            cell_backward(
                acts[t, :m],
                cells[t, :m],
                c_prev,
                dh,
                None,
                dc,
                None if d_s is None else d_s.to(dtype),
                d_p[t, :m, :g],
                dc,
                kern,
            )
        else:
            dh = _rows(dh, m)
            if ds is not None:
                ds = _rows(ds, m)
            cell_backward(
                acts[t, :m],
                cells[t, :m],
                c_prev,
                dh,
                None if d_out is None else d_out[t, :m],
                dc,
                ds,
                d_p[t, :m, :g],
                dc,
                kern,
            )
            d_s = attend_backward(t, t, as_state(torch.mm(d_p[t, :m, :g], w_x_mm)))
            dh = as_state(torch.mm(d_p[t, :m], w_h_mm))
            if sentinel:
                ds = torch.zeros_like(dh, dtype=dtype) if d_s is None else d_s.to(dtype)
    dh, dc = _rows(dh, b).to(dtype), _rows(dc, b)
    ds = None if ds is None else _rows(ds, b)
    # Weight gradients: one GEMM each over all B*T cells (over the real ones when rows shrink).
    h0f = h0.to(dtype).unsqueeze(0)
    h_in = torch.cat([h0f, hidden], 0) if current else torch.cat([h0f, hidden[:-1]], 0)
    real_idx = real_cells(active, b, d_p.device) if padded else None  # (T*B,) or None
    real_p = real_idx if real_idx is None or not current else real_cells((active[0], *active), b, d_p.device)
    d_w_h = mm(_flat(d_p, real_p).t(), _flat(h_in, real_p).to(mmt), dtype)
    d_gates = d_p[:steps, :, :g]  # row t's recurrent block = d gates of step t = d x_t
    if current:
        dh = mm(d_p[0, :, :g], w_h_mm[:g], dtype)
        x_in = torch.cat([torch.zeros_like(feeds[:1]), feeds[:-1]], 0)
    else:
        x_in = z_all
    d_w_x = mm(_flat(d_gates, real_idx).t(), _flat(x_in, real_idx).to(mmt), dtype)
    d_w_u = mm(_flat(d_p[1:, :, us], real_idx).t(), _flat(z_all, real_idx).to(mmt), dtype) if current else None
    d_b_h = None
    if b_h is not None:
        d_b_h = torch.cat([d_p.new_zeros(g, dtype=dtype), d_p[..., g:].to(dtype).sum((0, 1))]).to(b_h.dtype)
    sentinel_params = ctx.params[ctx.n_score :]
    d_keys, d_values, d_out_w, d_out_b, d_score, d_sentinel = att.finish(
        keys, values, need_values, p_all[..., qs], s_used, sentinel_params
    )
    h_dt, c_dt, s_dt = ctx.dtypes

    def cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
        return None if grad is None or like is None else grad.to(like.dtype)

    return (
        d_gates.transpose(0, 1).to(ctx.xg_dtype),
        d_keys,
        d_values,
        None,
        dh.to(h_dt),
        dc.to(c_dt),
        None if ds is None else ds.to(s_dt),
        d_w_h.to(w_h.dtype),
        d_b_h,
        d_w_x.to(w_x.dtype),
        cast(d_w_u, w_u),
        cast(d_out_w, att.out_w),
        cast(d_out_b, att.out_b),
        *(cast(gr, p) for gr, p in zip(d_score, ctx.params[: ctx.n_score])),
        *(cast(gr, p) for gr, p in zip(d_sentinel, sentinel_params)),
    )
