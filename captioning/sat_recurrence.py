"""The teacher-forced attention-LSTM recurrence with a hand-written backward (the speed path).

Autograd through the T-step Python loop spends much of a training step on bookkeeping:
every weight gradient becomes T thin products (inner size B), each added into a full-size
gradient buffer (16 MB for the 2048x2048 context matrix, 21 times a step), and every
intermediate of every step is kept alive. Here the forward runs the same maths with no graph
and keeps only what the backward needs; the backward walks the steps in reverse computing
only what depends on the recurrence, then forms every weight gradient as ONE product over
all B*T rows.

Per step (h = h_{t-1}, c = c_{t-1}; every matrix that multiplies the state stacked in W_h):

    query "previous" (Show-Attend-Tell):
        [r | g | q] = h @ W_h^T + b       recurrent gates, f_beta gate (C), projected query (H*Q)
        ctx, alpha[, beta] = attention(q [, sentinel s_{t-1}])
        z = sigmoid(g) * ctx              (z = ctx without the gate)
        gates = x_t + r + z @ W_x^T       x_t: embedding part, one GEMM for all steps outside
        i, f, o[, g_s] = sigmoid(.), g~ = tanh(.);  c = f c + i g~;  h = o tanh(c)  [s = g_s tanh(c)]
        output h
    query "current" (Luong, input feeding): gates = x_t + r_{t-1} + feed_{t-1} @ W_x^T; the LSTM
        step; then [r | g | q | u] = h_t @ W_h^T + b, attention with q (and s_t), z as above,
        feed_t = tanh(u + z @ W_u^T); output feed_t.

The attention is the layer's, through its hooks only (captioning/attention.py, captioning/scores.py,
docs/attention.md): ``fused_query_map`` (stacked into W_h), the scorer's ``scores_into`` /
``score_backward`` / ``scores_paired``, the layer's ``output_map`` (multi-head), and the one
masked softmax with :func:`~captioning.attention.softmax_backward`. No score formula is written
here, so every score and head count runs this path and follows its scorer's maths.

Padding is not computed: given each row's real length (``steps``), the rows are put longest
first and step t runs on the first rows only, those still going, shrinking the batch as short
captions end (the way packed sequences run through cuDNN's RNNs). Gradients are unchanged for
any loss that ignores padding.

The visual sentinel (``sentinel_rows``: s (M, D) -> the extra position's keys and values) is a
small map; its input gradient comes from autograd step by step, its parameter gradients from
one autograd call over all B*T rows at the end.

Tests (tests/test_sat_recurrence.py, tests/test_query_sentinel.py) check outputs and every
gradient against the plain autograd loop, for every score, multi-head, both query styles and
the sentinel. Precision: GEMMs run in ``matmul_dtype`` (e.g. bf16, the autocast dtype under
``torch.autocast``); states, softmax and the attention nonlinearity stay in float32 (or in the
input dtype when wider, e.g. float64 in tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from captioning.attention import PreparedMemory, masked_softmax, softmax_backward
from captioning.scores import AdditiveScorer, Scorer

QUERY_STYLES = ("previous", "current")


def _mm(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a @ b with b already in the matmul dtype; a is cast (small per-step tensors only)."""
    return torch.mm(a.to(b.dtype), b).to(out_dtype)


@dataclass
class RecurrencePlan:
    """The non-tensor settings of a fused recurrence.

    query: "previous" or "current"; scorer: the layer's scorer (its hooks); heads: H;
    gate: an f_beta gate row block in W_h; sentinel_rows: s (M, D) -> (keys (M*H, 1, A),
    values (M*H, 1, dv)) of the sentinel position, or None; matmul_dtype: GEMM dtype or None.
    Set by :func:`fused_recurrence` per call: ``n_score_params``, and ``active``: how many rows
    take part in each step (the first ones: rows come sorted by length), or None for all.
    """

    query: str
    scorer: Scorer
    heads: int = 1
    gate: bool = True
    sentinel_rows: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    matmul_dtype: torch.dtype | None = None
    n_score_params: int = 0
    active: list[int] | None = None


class RecurrenceOutput(NamedTuple):
    """out (B, T, D): h_t ("previous") or feed_t ("current"); alphas (B, T, S) image attention
    (over the image alone when a sentinel takes part); betas (B, T) sentinel weight or None;
    contexts (B, T, C) the (gated) context of every step."""

    out: Tensor
    alphas: Tensor
    betas: Tensor | None
    contexts: Tensor


def stack_state_maps(maps: list[tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
    """Every linear map applied to the state, (weight (R_i, D), bias (R_i,) or None) in the row
    order of ``w_h`` -> the stacked ``w_h`` (R, D) and ``b_h`` (R,) (zeros where a map has no
    bias) or None when no map has one."""
    w_h = torch.cat([w for w, _ in maps], 0)
    if all(b is None for _, b in maps):
        return w_h, None
    return w_h, torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in maps])


def autocast_matmul_dtype(device: torch.device) -> torch.dtype | None:
    """The GEMM dtype of the fused recurrence: the autocast dtype when autocast is on, else None."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def fused_recurrence(plan: RecurrencePlan, xg: Tensor, memory: PreparedMemory, h0: Tensor, c0: Tensor,
                     s0: Tensor | None, w_h: Tensor, b_h: Tensor | None, w_x: Tensor, w_u: Tensor | None = None,
                     output_map: tuple[Tensor, Tensor | None] | None = None, score_params: tuple = (),
                     sentinel_params: tuple = (), steps: Tensor | None = None) -> RecurrenceOutput:
    """Run the recurrence (module docstring) as one autograd node.

    Args:
        xg: (B, T, G) embedding part of the gates (G = 4D, 5D with a sentinel gate).
        memory: the layer's prepared keys/values/mask. h0, c0: (B, D). s0: (B, D) initial
            sentinel ("previous" with a sentinel) or None.
        w_h: (R, D) stacked [recurrent (G); gate (C) if plan.gate; query map (H*Q); combine
            state part (D) if "current"]; b_h: (R,) their biases (zeros for the recurrent rows) or None.
        w_x: (G, Cx) LSTM weights of the context ("previous") or fed-back vector ("current").
        w_u: (D, C) combine weights of the context ("current"). output_map: the layer's.
        score_params: ``plan.scorer.score_parameters()``; sentinel_params: every parameter
            ``plan.sentinel_rows`` and the scorer's ``scores_paired`` may read.
        steps: (B,) how many of the T steps count for each row (teacher forcing: its real target
            tokens), or None for all. A row's later steps are padding: they are not computed and
            come out as zeros, and gradients are those of the full loop whenever the loss ignores
            padding. Rows are sorted by length inside, so each step runs on only the rows still
            going (a batch of captions of 6-25 words does ~35% less work).
    """
    if plan.query not in QUERY_STYLES:
        raise ValueError(f"query must be one of {QUERY_STYLES}, got {plan.query!r}")
    plan.n_score_params = len(score_params)
    out_w, out_b = output_map if output_map is not None else (None, None)
    keys, values, mask = memory.keys, memory.values, memory.mask
    order, plan.active = longest_first(steps, xg.shape[0], xg.shape[1])
    if order is not None:  # the recurrence wants the rows that run longest first
        xg, keys, values, h0, c0 = (x.index_select(0, order) for x in (xg, keys, values, h0, c0))
        mask, s0 = (None if x is None else x.index_select(0, order) for x in (mask, s0))
    out, alphas, betas, contexts = _Recurrence.apply(plan, xg, keys, values, mask, h0, c0, s0,
                                                     w_h, b_h, w_x, w_u, out_w, out_b, *score_params,
                                                     *sentinel_params)
    if order is not None:
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        out, alphas, contexts = (x.index_select(0, back) for x in (out, alphas, contexts))
        betas = betas.index_select(0, back) if betas.numel() else betas
    return RecurrenceOutput(out, alphas, betas if plan.sentinel_rows is not None else None, contexts)


def longest_first(steps: Tensor | None, rows: int, length: int) -> tuple[Tensor | None, list[int] | None]:
    """steps (B,) real steps per row -> (the row order that puts the longest first, or None when
    they already are; the number of rows still going at each of the ``length`` steps, or None
    when every row runs them all)."""
    if steps is None:
        return None, None
    if steps.shape != (rows,):
        raise ValueError(f"steps must be one count per row, shape ({rows},), got {tuple(steps.shape)}")
    counts = steps.detach().to("cpu", torch.long).clamp(0, length)  # one device sync, then host maths
    if bool((counts == length).all()):
        return None, None
    ordered, order = counts.sort(descending=True, stable=True)
    active = (ordered.unsqueeze(0) > torch.arange(length).unsqueeze(1)).sum(1).tolist()
    if bool((order == torch.arange(rows)).all()):
        return None, active
    return order.to(steps.device), active


def lstm_cell(gates: Tensor, c: Tensor, sentinel: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The LSTM update of both decoders' plain (autograd) steps, the maths :func:`_cell` runs here.

    gates (N, 4D) pre-activations i, f, g, o (+ g_s (N, D) with the sentinel), c (N, D) ->
    h, c (N, D) and the sentinel s = sigmoid(g_s) * tanh(c) (N, D) or None (Lu et al. 2017).
    """
    if sentinel:
        i, f, g, o, g_s = gates.chunk(5, dim=-1)
    else:
        i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    tanh_c = torch.tanh(c)
    return torch.sigmoid(o) * tanh_c, c, torch.sigmoid(g_s) * tanh_c if sentinel else None


def plain_steps(advance: Callable, x_gates: Tensor, state: object, memory: object,
                sentinel: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Both decoders' plain (autograd) teacher forcing, the reference of the fused recurrence:
    ``advance(x_gates[:, t], state, memory) -> (out, alpha, beta, state)`` for every step t of
    x_gates (B, T, G) -> outputs (B, T, D), alphas (B, T, S), betas (B, T) or None."""
    outs, alphas, betas = [], [], []
    for t in range(x_gates.shape[1]):
        out, alpha, beta, state = advance(x_gates[:, t], state, memory)
        outs.append(out)
        alphas.append(alpha)
        betas.append(beta)
    return torch.stack(outs, 1), torch.stack(alphas, 1), torch.stack(betas, 1) if sentinel else None


def _cell(gates: Tensor, c: Tensor, act: Tensor, d: int, sentinel: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """LSTM update from pre-activations (B, G); act (B, G) receives the activations."""
    torch.sigmoid(gates, out=act)
    act[:, 2 * d:3 * d] = torch.tanh(gates[:, 2 * d:3 * d])
    i, f, g, o = act[:, :4 * d].chunk(4, dim=1)
    c = torch.addcmul(f * c, i, g)
    tanh_c = torch.tanh(c)
    return o * tanh_c, c, act[:, 4 * d:] * tanh_c if sentinel else None


def _cell_backward(act: Tensor, c: Tensor, c_prev: Tensor, dh: Tensor, dc: Tensor, ds: Tensor | None, d: int,
                   out: Tensor) -> Tensor:
    """Gradients of the gates' pre-activations into ``out`` (B, G); returns d c_{t-1}."""
    i, f, g, o = act[:, :4 * d].chunk(4, dim=1)
    tanh_c = torch.tanh(c)
    dc = dc + dh * o * (1 - tanh_c * tanh_c)
    if ds is not None:  # s = g_s tanh(c)
        g_s = act[:, 4 * d:]
        dc = dc + ds * g_s * (1 - tanh_c * tanh_c)
        out[:, 4 * d:] = ds * tanh_c * g_s * (1 - g_s)
    out[:, :d] = dc * g * i * (1 - i)
    out[:, d:2 * d] = dc * c_prev * f * (1 - f)
    out[:, 2 * d:3 * d] = dc * i * (1 - g * g)
    out[:, 3 * d:4 * d] = dh * tanh_c * o * (1 - o)
    return dc * f


class _AttentionSteps:
    """The attention layer inside the loop: per-step forward (no graph), hand-written backward.

    Heads are flattened into the batch (N = B*H); keys (N, S, A) and values (N, S, dv) are cast
    once. Saved per step: the image softmax per head, the joint weights with a sentinel, and
    the heads' contexts before a multi-head output map.
    """

    def __init__(self, plan: RecurrencePlan, keys: Tensor, values: Tensor, mask: Tensor | None, steps: int,
                 dtype: torch.dtype, mm: torch.dtype, out_w: Tensor | None, out_b: Tensor | None) -> None:
        b, h = keys.shape[0], plan.heads
        self.plan, self.b, self.h, self.n, self.dtype, self.mm, self.steps = plan, b, h, b * h, dtype, mm, steps
        self.key_shape, self.value_shape = keys.shape, values.shape
        self.s, self.dv = keys.shape[-2], values.shape[-1]
        self.keys = keys.to(dtype).reshape(self.n, self.s, keys.shape[-1])
        self.values = values.to(mm).reshape(self.n, self.s, self.dv)
        self.mask = None if mask is None else (mask if h == 1 else mask.repeat_interleave(h, 0)).unsqueeze(1)
        scorer = plan.scorer
        self.scores_into, self.paired = scorer.hook("scores_into"), scorer.hook("scores_paired")
        self.scratch = scorer.new_scratch(self.n, 1, self.keys) if scorer.offers("scores_into") else None
        self.sentinel = plan.sentinel_rows is not None
        # Zeros when rows sit out steps (padding): they must add nothing to the gradients formed at
        # the end. Without padding every cell is written: no fill needed.
        self.new = self.keys.new_zeros if plan.active is not None else self.keys.new_empty
        self.alpha_heads = self.new(self.n, steps, self.s)
        if self.sentinel:
            self.joint = self.new(self.n, steps, self.s + 1)
            ones = None if self.mask is None else self.mask.new_ones(self.n, 1, 1)  # the sentinel: always allowed
            self.joint_mask = None if self.mask is None else torch.cat([self.mask, ones], -1)
        self.out_w, self.out_b = out_w, out_b
        if out_w is not None:
            self.out_w_t = out_w.to(mm).t()
            self.ctx_heads = self.new(b, steps, h * self.dv)

    def forward(self, t: int, qp: Tensor, s: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """qp (b, H*Q) projected queries, s (b, D) sentinel of the first b <= B rows -> context
        (b, C), alpha (b, S), beta (b,)."""
        h, s_len = self.h, self.s
        b = qp.shape[0]
        n = b * h  # heads are flattened item-major: the first b items are the first n rows
        qh = qp.reshape(n, 1, -1)
        e = self.scores_into(qh, self.keys[:n], self.scratch)  # (n, 1, S)
        a = masked_softmax(e, None if self.mask is None else self.mask[:n])
        self.alpha_heads[:n, t] = a[:, 0]
        beta = None
        if s is None:
            ctx = torch.bmm(a.to(self.mm), self.values[:n]).to(self.dtype)  # (n, 1, dv)
        else:
            kx, vx = self.plan.sentinel_rows(s)  # (n, 1, A), (n, 1, dv)
            ex = self.paired(qh, kx.to(self.dtype), s_len).to(e.dtype)  # (n, 1)
            joint_mask = None if self.joint_mask is None else self.joint_mask[:n]
            w = masked_softmax(torch.cat([e, ex.unsqueeze(-1)], -1), joint_mask)  # (n, 1, S + 1)
            self.joint[:n, t] = w[:, 0]
            ctx = (torch.bmm(w[..., :s_len].to(self.mm), self.values[:n]).to(self.dtype)
                   + w[..., s_len:] * vx.to(self.dtype))
            beta = w[:, 0, s_len].view(b, h).mean(1) if h > 1 else w[:, 0, s_len]
        ctx = ctx.view(b, h * self.dv)
        if self.out_w is not None:
            self.ctx_heads[:b, t] = ctx
            ctx = _mm(ctx, self.out_w_t, self.dtype)
            if self.out_b is not None:
                ctx = ctx + self.out_b.to(self.dtype)
        alpha = a.view(b, h, s_len).mean(1) if h > 1 else a.view(b, s_len)
        return ctx, alpha, beta

    def begin_backward(self, need_values: bool) -> None:
        self.acc = self.plan.scorer.hook("score_backward")(self.keys)
        self.values_t = self.values.transpose(1, 2)  # (N, dv, S): (1, dv) @ (dv, S) is the fast bmm layout
        zeros = self.new  # (zeros with padding, see __init__)
        self.d_ctx_heads = zeros(self.n, self.steps, self.dv) if need_values else None
        if self.out_w is not None:
            self.out_w_mm = self.out_w.to(self.mm)
            self.d_out = zeros(self.b, self.steps, self.out_w.shape[0])
        if self.sentinel:
            self.d_ex = zeros(self.b, self.steps, self.h)
            self.d_vx = zeros(self.b, self.steps, self.h, self.dv)

    def _per_head(self, grad: Tensor) -> Tensor:  # (B, ...) of a head average -> (N, ...) per head
        return grad if self.h == 1 else (grad / self.h).repeat_interleave(self.h, 0)

    def backward(self, t: int, qp: Tensor, d_ctx: Tensor, d_alpha: Tensor | None, d_beta: Tensor | None,
                 s: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Step t's gradients for its first b rows: d_ctx (b, C), d_alpha (b, S), d_beta (b,) ->
        d_qp (b, H*Q), d_s (b, D)."""
        s_len, dtype, b = self.s, self.dtype, qp.shape[0]
        n = b * self.h
        if self.out_w is not None:
            self.d_out[:b, t] = d_ctx
            d_ctx = _mm(d_ctx, self.out_w_mm, dtype)  # (b, H*dv)
        d_ch = d_ctx.reshape(n, 1, self.dv)
        if self.d_ctx_heads is not None:
            self.d_ctx_heads[:n, t] = d_ch[:, 0]
        a = self.alpha_heads[:n, t].unsqueeze(1)  # (n, 1, S)
        d_a = None if d_alpha is None else self._per_head(d_alpha).unsqueeze(1)
        d_w = torch.bmm(d_ch.to(self.mm), self.values_t[:n]).to(dtype)  # (n, 1, S)
        qh = qp.reshape(n, 1, -1)
        if s is None:
            d_e = softmax_backward(a, d_w if d_a is None else d_w + d_a)  # masked cells -> 0
            return self.acc.step(d_e, qh).reshape(b, -1), None
        w = self.joint[:n, t].unsqueeze(1)  # (n, 1, S + 1)
        with torch.enable_grad():  # the sentinel position: a small map, autograd step by step
            q_, s_ = qh.detach().requires_grad_(True), s.detach().requires_grad_(True)
            # (views, not the leaves themselves: module hooks such as FlopCounterMode's refuse leaves here)
            kx, vx = self.plan.sentinel_rows(s_.view_as(s_))
            ex = self.paired(q_.view_as(q_), kx, s_len)  # (N, 1)
        d_wx = (d_ch * vx.detach().to(dtype)).sum(-1, keepdim=True)  # (N, 1, 1)
        if d_beta is not None:
            d_wx = d_wx + self._per_head(d_beta).view(n, 1, 1)
        d_joint = softmax_backward(w, torch.cat([d_w, d_wx], -1))
        d_e = d_joint[..., :s_len] if d_a is None else d_joint[..., :s_len] + softmax_backward(a, d_a)
        d_ex, d_vx = d_joint[..., s_len], w[..., s_len:] * d_ch  # (N, 1), (N, 1, dv)
        self.d_ex[:b, t], self.d_vx[:b, t] = d_ex.view(b, self.h), d_vx.view(b, self.h, self.dv)
        d_q, d_s = torch.autograd.grad((ex, vx), (q_, s_), (d_ex.to(ex.dtype), d_vx.to(vx.dtype)), allow_unused=True)
        d_qh = self.acc.step(d_e, qh)
        if d_q is not None:
            d_qh = d_qh + d_q
        return d_qh.reshape(b, -1), d_s

    def finish(self, keys: Tensor, values: Tensor, need_values: bool, queries: Tensor, s_used: Tensor | None,
               sentinel_params: tuple) -> tuple:
        """(d_keys, d_values, d_out_w, d_out_b, d_score_params, d_sentinel_params)."""
        d_keys, d_score = self.acc.finish()
        d_values = None
        if need_values:  # d V = sum_t w_t^T d ctx_t: one batched GEMM over the steps
            w = self.joint[..., :self.s] if self.sentinel else self.alpha_heads
            d_values = torch.bmm(w.transpose(1, 2).to(self.mm), self.d_ctx_heads.to(self.mm))
            d_values = d_values.reshape(self.value_shape).to(values.dtype)
        d_out_w = d_out_b = None
        if self.out_w is not None:
            flat = self.d_out.reshape(-1, self.d_out.shape[-1])
            d_out_w = _mm(flat.t(), self.ctx_heads.reshape(-1, self.ctx_heads.shape[-1]).to(self.mm), self.dtype)
            d_out_b = None if self.out_b is None else flat.sum(0)
        d_sentinel = (None,) * len(sentinel_params)
        trained = [p for p in sentinel_params if p.requires_grad]
        if self.sentinel and trained:  # the sentinel map's parameters: one call over all B*T rows
            with torch.enable_grad():
                kx, vx = self.plan.sentinel_rows(s_used.reshape(-1, s_used.shape[-1]))
                ex = self.paired(queries.reshape(vx.shape[0], 1, -1), kx, self.s)
                pairs = [(o, d.reshape(o.shape).to(o.dtype)) for o, d in ((ex, self.d_ex), (vx, self.d_vx))
                         if o.requires_grad]  # a location score reads no parameter here
                grads = iter(torch.autograd.grad([o for o, _ in pairs], trained, [d for _, d in pairs],
                                                 allow_unused=True))
            d_sentinel = tuple(next(grads) if p.requires_grad else None for p in sentinel_params)
        return d_keys.reshape(self.key_shape).to(keys.dtype), d_values, d_out_w, d_out_b, d_score, d_sentinel


class _Recurrence(torch.autograd.Function):
    """The time loop as one autograd node; see :func:`fused_recurrence` for the inputs."""

    @staticmethod
    def forward(ctx, plan: RecurrencePlan, xg: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None,
                h0: Tensor, c0: Tensor, s0: Tensor | None, w_h: Tensor, b_h: Tensor | None, w_x: Tensor,
                w_u: Tensor | None, out_w: Tensor | None, out_b: Tensor | None, *params: Tensor):
        ctx.set_materialize_grads(False)
        with torch.autocast(xg.device.type, enabled=False):  # dtypes are chosen explicitly
            dtype = torch.promote_types(xg.dtype, torch.float32)  # states and elementwise maths
            mm = plan.matmul_dtype or dtype
            b, steps, g = xg.shape
            d = h0.shape[-1]
            current, sentinel = plan.query == "current", plan.sentinel_rows is not None
            att = _AttentionSteps(plan, keys, values, mask, steps, dtype, mm, out_w, out_b)
            c_ctx = values.shape[-1] if out_w is None else out_w.shape[0]
            gs, qs, us = _layout(plan, w_h.shape[0], g, c_ctx, d)
            w_h_t, w_x_t = w_h.to(mm).t(), w_x.to(mm).t()  # cast once, not per step
            w_u_t = w_u.to(mm).t() if current else None
            bias = None if b_h is None else b_h[g:].to(dtype)
            xg_f = xg.to(dtype)
            active = plan.active or [b] * steps  # rows taking part in each step: the first ones
            # Zeros with padding: padding steps are not computed, and must add nothing later.
            new = xg_f.new_zeros if plan.active is not None else xg_f.new_empty
            hidden, cells, acts = new(b, steps, d), new(b, steps, d), new(b, steps, g)
            queries, alphas, z_all = new(b, steps, qs.stop - qs.start), new(b, steps, att.s), new(b, steps, c_ctx)
            betas = new(b, steps) if sentinel else new(0)
            ctx_all, gate_all = (new(b, steps, c_ctx), new(b, steps, c_ctx)) if plan.gate else (None, None)
            feeds = new(b, steps, d) if current else None
            s_used = new(b, steps, d) if sentinel else None
            h, c = h0.to(dtype), c0.to(dtype)
            s = None if s0 is None else s0.to(dtype)
            r = _mm(h, w_h_t[:, :g], dtype) if current else None
            feed = h.new_zeros(b, d) if current else None
            for t in range(steps):
                m = active[t]  # rows still going: the state of the others is no longer needed
                if m == 0:
                    break
                if m < h.shape[0]:
                    h, c = h[:m], c[:m]
                    s = None if s is None else s[:m]
                    if current:
                        r, feed = r[:m], feed[:m]
                if current:  # LSTM first, then attend with h_t
                    h, c, s = _cell(xg_f[:m, t] + r + _mm(feed, w_x_t, dtype), c, acts[:m, t], d, sentinel)
                    hidden[:m, t], cells[:m, t] = h, c
                p = _mm(h, w_h_t, dtype)  # (m, R): every product on the state in one GEMM
                if bias is not None:
                    p[:, g:] += bias
                queries[:m, t] = p[:, qs]
                if sentinel:
                    s_used[:m, t] = s
                context, alphas[:m, t], beta = att.forward(t, p[:, qs], s if sentinel else None)
                if beta is not None:
                    betas[:m, t] = beta
                if plan.gate:
                    gate = torch.sigmoid(p[:, gs])
                    ctx_all[:m, t], gate_all[:m, t] = context, gate
                    context = gate * context
                z_all[:m, t] = context
                if current:
                    r = p[:, :g]
                    feed = torch.tanh(p[:, us] + _mm(context, w_u_t, dtype))
                    feeds[:m, t] = feed
                else:
                    h, c, s = _cell(xg_f[:m, t] + p[:, :g] + _mm(context, w_x_t, dtype), c, acts[:m, t], d,
                                    sentinel)
                    hidden[:m, t], cells[:m, t] = h, c
        ctx.save_for_backward(keys, values, h0, c0, w_h, b_h, w_x, w_u, hidden, cells, acts, queries, z_all,
                              ctx_all, gate_all, feeds, s_used)
        ctx.plan, ctx.att, ctx.mm, ctx.xg_dtype, ctx.params = plan, att, mm, xg.dtype, params
        ctx.active = active
        ctx.dtypes = (h0.dtype, c0.dtype, None if s0 is None else s0.dtype)
        out = feeds if current else hidden
        return out.to(xg.dtype), alphas, betas, z_all.to(xg.dtype)  # alphas stay >= float32, as softmax does

    @staticmethod
    def backward(ctx, d_out, d_alphas, d_betas, d_contexts):
        with torch.autocast(ctx.saved_tensors[8].device.type, enabled=False):
            return (None, *_backward(ctx, d_out, d_alphas, d_betas, d_contexts))


def _layout(plan: RecurrencePlan, rows: int, g: int, c_ctx: int, d: int) -> tuple[slice, slice, slice]:
    """Row blocks of W_h after the recurrent ones: gate, query, combine ("current")."""
    gate_end = g + (c_ctx if plan.gate else 0)
    q_end = rows - (d if plan.query == "current" else 0)
    return slice(g, gate_end), slice(gate_end, q_end), slice(q_end, rows)


def _real_cells(active: list[int], rows: int, device: torch.device) -> Tensor:
    """Flat indices of the (row, step) cells of a (rows, len(active)) grid that took part in
    their step (rows are sorted longest first, so step t's are the first ``active[t]``)."""
    going = torch.arange(rows).unsqueeze(1) < torch.tensor(active).unsqueeze(0)  # (rows, T)
    return going.reshape(-1).nonzero().squeeze(1).to(device)


def _cells(x: Tensor, real: Tensor | None) -> Tensor:
    """(B, T, X) -> (B*T, X), or only the ``real`` cells' rows (padding adds nothing to a gradient)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if real is None else flat.index_select(0, real)


def _rows(x: Tensor, m: int) -> Tensor:
    """A carried gradient (k, D) -> (m, D): rows that join at their last step start from zero."""
    return x if x.shape[0] >= m else torch.cat([x, x.new_zeros(m - x.shape[0], x.shape[1])])


def _backward(ctx, d_out, d_alphas, d_betas, d_contexts) -> tuple:
    """Reverse-time loop; one gradient (or None) per forward input after ``plan``."""
    (keys, values, h0, c0, w_h, b_h, w_x, w_u, hidden, cells, acts, queries, z_all, ctx_all, gate_all, feeds,
     s_used) = ctx.saved_tensors
    plan, att, mm = ctx.plan, ctx.att, ctx.mm
    dtype = hidden.dtype
    b, steps, d = hidden.shape
    g, c_ctx = acts.shape[-1], z_all.shape[-1]
    current, sentinel = plan.query == "current", s_used is not None
    gs, qs, us = _layout(plan, w_h.shape[0], g, c_ctx, d)
    w_h_mm, w_x_mm = w_h.to(mm), w_x.to(mm)
    w_u_mm = w_u.to(mm) if current else None
    d_out, d_alphas, d_betas, d_contexts = (None if x is None or x.numel() == 0 else x.to(dtype)
                                            for x in (d_out, d_alphas, d_betas, d_contexts))
    need_values = ctx.needs_input_grad[3]
    att.begin_backward(need_values)
    # Row t of d_p: d of [r | g | q | u] of the GEMM that feeds step t's gates ("previous": that
    # of step t itself; "current": that of step t-1's state, row 0 = the initial state). Zeros
    # where a row sat out a step (padding), so the weight gradients below can take all rows.
    padded = plan.active is not None
    d_p = (hidden.new_zeros if current or padded else hidden.new_empty)(b, steps + int(current), w_h.shape[0])
    # Carried gradients have a row per row still going: rows join (with zeros) at their last step.
    dh, dc = hidden.new_zeros(0, d), hidden.new_zeros(0, d)
    ds = hidden.new_zeros(0, d) if sentinel and not current else None
    active = ctx.active

    def attend_backward(t: int, row: int, dz: Tensor) -> Tensor | None:
        m = dz.shape[0]
        if d_contexts is not None:
            dz = dz + d_contexts[:m, t]
        if plan.gate:
            gate = gate_all[:m, t]
            d_context = dz * gate
            d_p[:m, row, gs] = dz * ctx_all[:m, t] * gate * (1 - gate)
        else:
            d_context = dz
        d_qp, d_s = att.backward(t, queries[:m, t], d_context, None if d_alphas is None else d_alphas[:m, t],
                                 None if d_betas is None else d_betas[:m, t], s_used[:m, t] if sentinel else None)
        d_p[:m, row, qs] = d_qp
        return d_s

    for t in reversed(range(steps)):
        m = active[t]
        if m == 0:
            continue
        c_prev = cells[:m, t - 1] if t > 0 else c0[:m].to(dtype)
        dc = _rows(dc, m)
        if current:
            d_feed = _mm(d_p[:m, t + 1, :g], w_x_mm, dtype)  # feed_t enters step t+1's gates
            if d_out is not None:
                d_feed = d_feed + d_out[:m, t]
            feed = feeds[:m, t]
            d_u = d_feed * (1 - feed * feed)
            d_p[:m, t + 1, us] = d_u
            d_s = attend_backward(t, t + 1, _mm(d_u, w_u_mm, dtype))
            dh = _mm(d_p[:m, t + 1], w_h_mm, dtype)
            dc = _cell_backward(acts[:m, t], cells[:m, t], c_prev, dh, dc, d_s, d, d_p[:m, t, :g])
        else:
            dh = _rows(dh, m)
            if ds is not None:
                ds = _rows(ds, m)
            if d_out is not None:
                dh = dh + d_out[:m, t]
            dc = _cell_backward(acts[:m, t], cells[:m, t], c_prev, dh, dc, ds, d, d_p[:m, t, :g])
            d_s = attend_backward(t, t, _mm(d_p[:m, t, :g], w_x_mm, dtype))
            dh = _mm(d_p[:m, t], w_h_mm, dtype)
            if sentinel:
                ds = torch.zeros_like(dh) if d_s is None else d_s.to(dtype)
    dh, dc = _rows(dh, b), _rows(dc, b)
    ds = None if ds is None else _rows(ds, b)
    # Weight gradients: one GEMM each over all B*T rows (over the real ones when there is padding).
    h0f = h0.to(dtype).unsqueeze(1)
    h_in = torch.cat([h0f, hidden], 1) if current else torch.cat([h0f, hidden[:, :-1]], 1)
    real = _real_cells(active, b, d_p.device) if padded else None  # (B*T,) or None
    real_p = real if real is None or not current else _real_cells([active[0], *active], b, d_p.device)
    d_w_h = _mm(_cells(d_p, real_p).t(), _cells(h_in, real_p).to(mm), dtype)
    d_gates = d_p[:, :steps, :g]  # row t's recurrent block = d gates of step t = d x_t
    if current:
        dh = _mm(d_p[:, 0, :g], w_h_mm[:g], dtype)
        x_in = torch.cat([torch.zeros_like(feeds[:, :1]), feeds[:, :-1]], 1)
    else:
        x_in = z_all
    d_w_x = _mm(_cells(d_gates, real).t(), _cells(x_in, real).to(mm), dtype)
    d_w_u = _mm(_cells(d_p[:, 1:, us], real).t(), _cells(z_all, real).to(mm), dtype) if current else None
    d_b_h = None
    if b_h is not None:
        d_b_h = torch.cat([torch.zeros_like(d_p[0, 0, :g]), d_p[..., g:].sum((0, 1))]).to(b_h.dtype)
    n_score = plan.n_score_params
    sentinel_params = ctx.params[n_score:]
    d_keys, d_values, d_out_w, d_out_b, d_score, d_sentinel = att.finish(keys, values, need_values, queries, s_used,
                                                                          sentinel_params)
    h_dt, c_dt, s_dt = ctx.dtypes
    cast = lambda grad, like: None if grad is None else grad.to(like.dtype)  # noqa: E731
    return (d_gates.to(ctx.xg_dtype), d_keys, d_values, None, dh.to(h_dt), dc.to(c_dt),
            None if ds is None else ds.to(s_dt), d_w_h.to(w_h.dtype), d_b_h, d_w_x.to(w_x.dtype),
            None if d_w_u is None else d_w_u.to(w_u.dtype),
            cast(d_out_w, att.out_w) if att.out_w is not None else None,
            cast(d_out_b, att.out_b) if att.out_b is not None else None,
            *(cast(gr, p) for gr, p in zip(d_score, ctx.params[:n_score])),
            *(cast(gr, p) for gr, p in zip(d_sentinel, sentinel_params)))


class SATRecurrence:
    """Compatibility entry point for callers of the previous fused recurrence (single-head
    additive attention, query "previous", the score vector ``v`` passed in): use
    :func:`fused_recurrence` instead. ``apply`` has the old signature and outputs."""

    @staticmethod
    def apply(xg: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, h0: Tensor, c0: Tensor, w_h: Tensor,
              b_gate: Tensor | None, v: Tensor, w_c: Tensor, matmul_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        """Returns hidden (B, T, D), alphas (B, T, S)."""
        scorer = AdditiveScorer.__new__(AdditiveScorer)  # the additive maths around the given v
        nn.Module.__init__(scorer)
        scorer.v = SimpleNamespace(weight=v.view(1, -1))
        g = xg.shape[-1]
        b_h = None
        if b_gate is not None:
            b_h = torch.cat([b_gate.new_zeros(g), b_gate, b_gate.new_zeros(w_h.shape[0] - g - b_gate.shape[0])])
        plan = RecurrencePlan("previous", scorer, gate=b_gate is not None, matmul_dtype=matmul_dtype)
        out = fused_recurrence(plan, xg, PreparedMemory(keys, values, mask), h0, c0, None, w_h, b_h, w_c,
                               score_params=(scorer.v.weight,))
        return out.out, out.alphas
