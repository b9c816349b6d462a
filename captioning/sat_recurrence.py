"""The teacher-forced Show-Attend-Tell recurrence with a hand-written backward (the speed path).

Autograd through the T-step Python loop spends much of a training step on bookkeeping:
every weight gradient becomes T thin products (inner size B), each added into a full-size
gradient buffer (16 MB for the 2048x2048 context matrix, 21 times a step), and every
intermediate of every step is kept alive. Here the forward runs the same maths with no graph
and keeps only what the backward needs; the backward walks the steps in reverse computing
only what depends on the recurrence, then forms every weight gradient as ONE product over
all B*T rows.

Per step (h = h_{t-1}, c = c_{t-1}; K = prepared keys (B, S, A), F = values (B, S, C)):

    [r | g | q] = h @ W_h^T          one GEMM: recurrent gates (4D), f_beta (C), query (A)
    e = tanh(q + K) @ v;  alpha = masked_softmax(e);  ctx = alpha @ F
    z = sigmoid(g + b_g) * ctx       (z = ctx without the gate)
    gates = x_t + z @ W_c^T + r      x_t: embedding part, one GEMM for all steps outside
    i, f, o = sigmoid(.), g~ = tanh(.);  c = f c + i g~;  h = o tanh(c)

The (B, S, A) tanh is the largest elementwise op of a step, and PyTorch's CPU tanh is ~6x
slower than its sigmoid, so it is written tanh(x) = 2 sigmoid(2x) - 1 and the affine part is
folded into the score: e = 2 (sigmoid(2q + 2K) @ v) - sum(v). Same function; in float32 the
scores differ from torch.tanh's by rounding only (~1e-6, like any reordering of the sum).

This is exactly :class:`captioning.decoders.ShowAttendTellDecoder` with additive attention;
tests/test_decoders.py checks outputs and every gradient against the plain autograd loop.

Precision: GEMMs run in ``matmul_dtype`` (e.g. bf16, the autocast dtype under
``torch.autocast``); states, softmax and the attention nonlinearity stay in float32 (or in the
input dtype when wider, e.g. float64 in tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

from captioning.attention import masked_softmax


def _mm(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a @ b with b already in the matmul dtype; a is cast (small per-step tensors only)."""
    return torch.mm(a.to(b.dtype), b).to(out_dtype)


def _attention_sigmoid(keys2: Tensor, query: Tensor, out: Tensor) -> Tensor:
    """out = sigmoid(2K + 2q) (B, S, A): keys2 = 2K (B, S, A), query q (B, A)."""
    return torch.add(keys2, query.unsqueeze(1), alpha=2, out=out).sigmoid_()


class SATRecurrence(torch.autograd.Function):
    """The Show-Attend-Tell time loop as one autograd node.

    Inputs: xg (B, T, 4D) embedding part of the gates; keys (B, S, A) prepared (projected)
    keys; values (B, S, C); mask (B, S) bool or None; h0, c0 (B, D); w_h (4D [+ C] + A, D)
    stacked recurrent / f_beta / query weights; b_gate (C,) or None (no gate); v (A,) additive
    score vector; w_c (4D, C) context part of the LSTM input weights; matmul_dtype or None.
    Outputs: hidden (B, T, D) the h_t, alphas (B, T, S).
    """

    @staticmethod
    def forward(ctx, xg: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, h0: Tensor, c0: Tensor,
                w_h: Tensor, b_gate: Tensor | None, v: Tensor, w_c: Tensor,
                matmul_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        with torch.autocast(xg.device.type, enabled=False):  # dtypes are chosen explicitly
            dtype = torch.promote_types(xg.dtype, torch.float32)  # states and elementwise maths
            mm_dtype = matmul_dtype or dtype
            b, steps, four_d = xg.shape
            d, a, c_dim = four_d // 4, keys.shape[-1], values.shape[-1]
            w_h_t, w_c_t = w_h.to(mm_dtype).t(), w_c.to(mm_dtype).t()  # cast once, not per step
            keys2, values_mm, v_f = 2 * keys.to(dtype), values.to(mm_dtype), v.to(dtype)
            v_sum = v_f.sum()
            xg_f = xg.to(dtype)
            hidden, cells = xg_f.new_empty(b, steps, d), xg_f.new_empty(b, steps, d)
            acts = xg_f.new_empty(b, steps, four_d)  # sigmoid(i), sigmoid(f), tanh(g~), sigmoid(o)
            queries, alphas = xg_f.new_empty(b, steps, a), xg_f.new_empty(b, steps, keys.shape[1])
            z_all = xg_f.new_empty(b, steps, c_dim)
            gated = b_gate is not None
            ctx_all = torch.empty_like(z_all) if gated else None
            beta_all = torch.empty_like(z_all) if gated else None
            s_buf = torch.empty_like(keys2)  # (B, S, A) scratch reused every step: stays in cache
            h, c = h0.to(dtype), c0.to(dtype)
            for t in range(steps):
                p = _mm(h, w_h_t, dtype)  # (B, 4D [+ C] + A)
                q = p[:, -a:]
                queries[:, t] = q
                sig = _attention_sigmoid(keys2, q, s_buf)
                scores = torch.mv(sig.view(-1, a), v_f).view(b, -1).mul_(2).sub_(v_sum)  # (B, S)
                alpha = masked_softmax(scores, mask)
                alphas[:, t] = alpha
                context = torch.bmm(alpha.to(mm_dtype).unsqueeze(1), values_mm).squeeze(1).to(dtype)  # (B, C)
                if gated:
                    beta = torch.sigmoid(p[:, four_d:four_d + c_dim] + b_gate)
                    ctx_all[:, t], beta_all[:, t] = context, beta
                    context = beta * context
                z_all[:, t] = context
                gates = xg_f[:, t] + p[:, :four_d] + _mm(context, w_c_t, dtype)
                act = acts[:, t]
                torch.sigmoid(gates, out=act)
                act[:, 2 * d:3 * d] = torch.tanh(gates[:, 2 * d:3 * d])
                i, f, g, o = act.chunk(4, dim=1)
                c = torch.addcmul(f * c, i, g)
                h = o * torch.tanh(c)
                hidden[:, t], cells[:, t] = h, c
        ctx.save_for_backward(keys, values, mask, h0, c0, w_h, b_gate, v, w_c, hidden, cells, acts, queries,
                              alphas, z_all, ctx_all, beta_all)
        ctx.mm_dtype, ctx.xg_dtype = mm_dtype, xg.dtype
        return hidden.to(xg.dtype), alphas  # alphas stay >= float32, as softmax does under autocast

    @staticmethod
    def backward(ctx, d_hidden: Tensor, d_alphas: Tensor):
        (keys, values, mask, h0, c0, w_h, b_gate, v, w_c, hidden, cells, acts, queries, alphas, z_all,
         ctx_all, beta_all) = ctx.saved_tensors
        with torch.autocast(hidden.device.type, enabled=False):
            grads = _backward(ctx, d_hidden, d_alphas, keys, values, h0, c0, w_h, b_gate, v, w_c, hidden, cells,
                              acts, queries, alphas, z_all, ctx_all, beta_all)
        return grads


def _backward(ctx, d_hidden, d_alphas, keys, values, h0, c0, w_h, b_gate, v, w_c, hidden, cells, acts, queries,
              alphas, z_all, ctx_all, beta_all) -> tuple:
    """Reverse-time loop; see SATRecurrence. Returns one gradient (or None) per forward input."""
    mm_dtype, dtype = ctx.mm_dtype, hidden.dtype
    b, steps, d = hidden.shape
    four_d, a, c_dim = 4 * d, keys.shape[-1], values.shape[-1]
    gated = b_gate is not None
    w_h_mm, w_c_mm = w_h.to(mm_dtype), w_c.to(mm_dtype)
    values_t = values.to(mm_dtype).transpose(1, 2)  # (B, C, S): (1, C) @ (C, S) is the fast bmm layout
    keys2, v_f = 2 * keys.to(dtype), v.to(dtype)
    d_hidden, d_alphas = d_hidden.to(dtype), d_alphas.to(dtype)
    need_values = ctx.needs_input_grad[2]

    d_p = hidden.new_empty(b, steps, w_h.shape[0])  # grads of the stacked [r | g | q], every step
    d_gates = d_p[..., :four_d]  # d gates = d r = d x_t
    d_ctx_all = hidden.new_empty(b, steps, c_dim) if need_values else None
    d_pre = torch.zeros_like(keys2)  # sum over steps of d(score pre-activation) / v
    d_v = torch.zeros_like(v_f)
    s_buf = torch.empty_like(keys2)
    dh, dc = torch.zeros_like(hidden[:, 0]), torch.zeros_like(hidden[:, 0])
    for t in reversed(range(steps)):
        dh = dh + d_hidden[:, t]
        i, f, g, o = acts[:, t].chunk(4, dim=1)
        c_prev = cells[:, t - 1] if t > 0 else c0.to(dtype)
        tanh_c = torch.tanh(cells[:, t])
        dc = dc + dh * o * (1 - tanh_c * tanh_c)
        dg = d_gates[:, t]
        dg[:, :d] = dc * g * i * (1 - i)
        dg[:, d:2 * d] = dc * c_prev * f * (1 - f)
        dg[:, 2 * d:3 * d] = dc * i * (1 - g * g)
        dg[:, 3 * d:] = dh * tanh_c * o * (1 - o)
        dc = dc * f
        dz = _mm(dg, w_c_mm, dtype)  # (B, C)
        if gated:
            beta = beta_all[:, t]
            d_context = dz * beta
            d_p[:, t, four_d:four_d + c_dim] = dz * ctx_all[:, t] * beta * (1 - beta)
        else:
            d_context = dz
        if need_values:
            d_ctx_all[:, t] = d_context
        d_alpha = torch.bmm(d_context.to(mm_dtype).unsqueeze(1), values_t).squeeze(1).to(dtype) + d_alphas[:, t]
        alpha = alphas[:, t]
        d_e = alpha * (d_alpha - (alpha * d_alpha).sum(-1, keepdim=True))  # softmax; masked cells -> 0
        # e = 2 sig @ v - sum(v), sig = sigmoid(2(q + K)), recomputed (cheaper than storing T copies).
        sig = _attention_sigmoid(keys2, queries[:, t], s_buf)
        d_e_row = d_e.unsqueeze(1)  # (B, 1, S)
        d_v += 2 * torch.bmm(d_e_row, sig).sum((0, 1)) - d_e.sum()
        # d pre-activation (q + K) = d_e * v * 4 sig (1 - sig); the factor v is applied once at the end.
        sig_grad = sig.addcmul_(sig, sig, value=-1)  # sig - sig^2, in place
        d_p[:, t, -a:] = 4 * v_f * torch.bmm(d_e_row, sig_grad).squeeze(1)
        d_pre.addcmul_(sig_grad, d_e.unsqueeze(-1), value=4)
        dh = _mm(d_p[:, t], w_h_mm, dtype)
    # Weight gradients: one GEMM each over all B*T rows (step t's inputs: h_{t-1} and z_t).
    h_prev = torch.cat([h0.to(dtype).unsqueeze(1), hidden[:, :-1]], 1)
    d_w_h = _mm(d_p.reshape(-1, d_p.shape[-1]).t(), h_prev.reshape(-1, d).to(mm_dtype), dtype)
    d_w_c = _mm(d_gates.reshape(-1, four_d).t(), z_all.reshape(-1, c_dim).to(mm_dtype), dtype)
    d_b_gate = d_p[..., four_d:four_d + c_dim].sum((0, 1)).to(b_gate.dtype) if gated else None
    d_values = None
    if need_values:  # d F = sum_t alpha_t^T d ctx_t: one batched GEMM over the steps
        d_values = torch.bmm(alphas.transpose(1, 2).to(mm_dtype), d_ctx_all.to(mm_dtype)).to(values.dtype)
    d_keys = d_pre.mul_(v_f).to(keys.dtype)
    return (d_gates.to(ctx.xg_dtype), d_keys, d_values, None, dh.to(h0.dtype), dc.to(c0.dtype),
            d_w_h.to(w_h.dtype), d_b_gate, d_v.to(v.dtype), d_w_c.to(w_c.dtype), None)


@torch.no_grad()
def additive_attention_into(scorer: torch.nn.Module, query: Tensor, keys: Tensor, values: Tensor,
                            mask: Tensor | None, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """Additive attention for K queries per item, inference only, with no large temporaries.

    Same maths as ``Attention(score="additive")`` (see :class:`captioning.attention.AdditiveScorer`),
    but the (B, K, S, A) intermediate, the largest tensor of a beam-search step, is never
    allocated: items are scored a chunk at a time in ``scratch``, small enough to stay in
    cache (a fresh 77 MB tensor per step costs page faults, several times the arithmetic).

    Args:
        scorer: an AdditiveScorer. query: (B, K, Dq). keys: (B, S, A) prepared. values (B, S, C).
        mask: (B, S) bool or None. scratch: (n, K, S, A) buffer, any n >= 1, overwritten.
    Returns:
        context (B, K, C), alpha (B, K, S).
    """
    q2 = 2 * scorer.query_proj(query).unsqueeze(2)  # (B, K, 1, A)
    v = scorer.v.weight.view(-1)
    v2 = 2 * v.to(scratch.dtype)
    b, n = q2.shape[0], scratch.shape[0]
    scores = q2.new_empty(b, q2.shape[1], keys.shape[1], dtype=scratch.dtype)  # (B, K, S)
    for i in range(0, b, n):
        m = min(n, b - i)
        sig = torch.add(q2[i:i + m], keys[i:i + m].unsqueeze(1), alpha=2, out=scratch[:m]).sigmoid_()
        torch.matmul(sig, v2, out=scores[i:i + m])  # 2 sigmoid(2q + 2K) @ v
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).sub_(v.sum())  # = tanh(q + K) @ v, >= fp32
    alpha = masked_softmax(scores, None if mask is None else mask.unsqueeze(1))
    return torch.bmm(alpha.to(values.dtype), values), alpha
