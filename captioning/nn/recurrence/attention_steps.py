"""The attention layer inside the fused recurrence: per-step forward (no graph) and hand-written
backward, through the layer's hooks only (the scorer's ``scores_into`` / ``score_backward`` /
``scores_paired``, the layer's output map, the one masked softmax), so every score and head
count takes this path and follows its scorer's maths.

Heads are flattened into the batch (N = B*H, item-major); keys (N, S, A) and values (N, S, dv)
are cast once. Buffers are time-major, (T, N, .): step t's rows are contiguous. Saved per step:
the image softmax per head, the joint weights with a sentinel, and the heads' contexts before a
multi-head output map. With the fused kernels (CUDA), a single head without a sentinel runs
softmax + context (+ the gate) as one kernel and the softmax backward as another.
"""

from __future__ import annotations

import torch
from torch import Tensor

from captioning.nn.attention import masked_softmax, softmax_backward
from captioning.nn.recurrence.plan import RecurrencePlan


def mm(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a @ b with b already in the GEMM dtype; a is cast (small per-step tensors only)."""
    return torch.mm(a.to(b.dtype), b).to(out_dtype)


class AttentionSteps:
    """One attention step per decoder step for the first b <= B rows (see module docstring)."""

    def __init__(
        self,
        plan: RecurrencePlan,
        keys: Tensor,
        values: Tensor,
        mask: Tensor | None,
        steps: int,
        dtype: torch.dtype,
        mm_dtype: torch.dtype,
        out_w: Tensor | None,
        out_b: Tensor | None,
        zero_fill: bool,
        kernels: bool,
    ) -> None:
        b, h = keys.shape[0], plan.heads
        self.plan, self.b, self.h, self.n, self.steps = plan, b, h, b * h, steps
        self.dtype, self.mm = dtype, mm_dtype
        self.key_shape, self.value_shape = keys.shape, values.shape
        self.s, self.dv = keys.shape[-2], values.shape[-1]
        self.keys = keys.to(dtype).reshape(self.n, self.s, keys.shape[-1])
        self.values = values.to(mm_dtype).reshape(self.n, self.s, self.dv).contiguous()
        self.mask = None if mask is None else (mask if h == 1 else mask.repeat_interleave(h, 0))  # (N, S)
        scorer = plan.scorer
        self.scores_into, self.paired = scorer.hook("scores_into"), scorer.hook("scores_paired")
        self.scratch = scorer.new_scratch(self.n, 1, self.keys) if scorer.offers("scores_into") else None
        self.sentinel = plan.sentinel_rows is not None
        self.sentinel_rows = plan.sentinel_rows or _no_sentinel
        # The one-kernel step: a single head without a sentinel (the others run plain PyTorch ops).
        self.kernels = kernels and h == 1 and not self.sentinel and out_w is None
        # Zeros when rows sit out steps (padding): they must add nothing to the gradients formed at
        # the end. Otherwise every cell is written: no fill needed.
        self.new = self.keys.new_zeros if zero_fill else self.keys.new_empty
        self.alpha_heads = self.new(steps, self.n, self.s)
        # What the recurrence outputs: the heads' average (the softmax itself for one head).
        self.alphas = self.alpha_heads if h == 1 else self.new(steps, b, self.s)
        self.betas = self.new(steps, b) if self.sentinel else self.keys.new_empty(0)  # (T, B)
        if self.sentinel:
            self.joint = self.new(steps, self.n, self.s + 1)
            self.joint_mask = None if self.mask is None else torch.cat([self.mask, self.mask.new_ones(self.n, 1)], -1)
        self.out_w, self.out_b = out_w, out_b
        if out_w is not None:
            self.out_w_t = out_w.to(mm_dtype).t()
            self.ctx_heads = self.new(steps, b, h * self.dv)

    # ------------------------------------------------------------------ forward
    def forward(
        self, t: int, qp: Tensor, s: Tensor | None, ctx_out: Tensor, gate_pre: Tensor | None, z_out: Tensor
    ) -> None:
        """Step t for the first b rows: projected queries qp (b, H*Q) [, sentinel s (b, D)] ->
        ctx_out (b, C) the context; z_out (b, C) = sigmoid(gate_pre) * context, or the context
        when gate_pre is None (then z_out may be ctx_out). Also records alphas/betas of step t."""
        h, s_len = self.h, self.s
        b = qp.shape[0]
        n = b * h  # heads are flattened item-major: the first b items are the first n rows
        qh = qp.to(self.dtype).reshape(n, 1, -1)
        e = self.scores_into(qh, self.keys[:n], self.scratch)  # (n, 1, S)
        mask = None if self.mask is None else self.mask[:n]
        if self.kernels:
            from captioning.nn.kernels.attention import softmax_context

            softmax_context(
                e.view(n, s_len),
                mask,
                self.values[:n],
                self.alpha_heads[t, :n],
                ctx_out,
                gate_pre,
                None if gate_pre is None else z_out,
            )
            if gate_pre is None and z_out is not ctx_out:
                z_out.copy_(ctx_out)
            return
        a = masked_softmax(e, None if mask is None else mask.unsqueeze(1))
        self.alpha_heads[t, :n] = a[:, 0]
        if s is None:
            ctx = torch.bmm(a.to(self.mm), self.values[:n]).to(self.dtype)  # (n, 1, dv)
        else:
            kx, vx = self.sentinel_rows(s)  # (n, 1, A), (n, 1, dv)
            ex = self.paired(qh, kx.to(self.dtype), s_len).to(e.dtype)  # (n, 1)
            joint_mask = None if self.joint_mask is None else self.joint_mask[:n].unsqueeze(1)
            w = masked_softmax(torch.cat([e, ex.unsqueeze(-1)], -1), joint_mask)  # (n, 1, S + 1)
            self.joint[t, :n] = w[:, 0]
            ctx = torch.bmm(w[..., :s_len].to(self.mm), self.values[:n]).to(self.dtype) + w[..., s_len:] * vx.to(
                self.dtype
            )
            beta = w[:, 0, s_len].view(b, h).mean(1) if h > 1 else w[:, 0, s_len]
            self.betas[t, :b] = beta
        ctx = ctx.view(b, h * self.dv)
        if self.out_w is not None:
            self.ctx_heads[t, :b] = ctx
            ctx = mm(ctx, self.out_w_t, self.dtype)
            if self.out_b is not None:
                ctx = ctx + self.out_b.to(self.dtype)
        if h > 1:
            self.alphas[t, :b] = a.view(b, h, s_len).mean(1)
        if gate_pre is None:
            z_out.copy_(ctx)
            if ctx_out is not z_out:
                ctx_out.copy_(ctx)
            return
        ctx_out.copy_(ctx)
        z_out.copy_(torch.sigmoid(gate_pre.to(self.dtype)) * ctx)

    # ------------------------------------------------------------------ backward
    def begin_backward(self, need_values: bool) -> None:
        self.acc = self.plan.scorer.hook("score_backward")(self.keys)
        self.values_t = self.values.transpose(1, 2)  # (N, dv, S): (1, dv) @ (dv, S) is the fast bmm layout
        zeros = self.new  # (zeros with padding, see __init__)
        self.d_ctx_heads = zeros(self.steps, self.n, self.dv) if need_values else None
        if self.out_w is not None:
            self.out_w_mm = self.out_w.to(self.mm)
            self.d_out = zeros(self.steps, self.b, self.out_w.shape[0])
        if self.sentinel:
            self.d_ex = zeros(self.steps, self.b, self.h)
            self.d_vx = zeros(self.steps, self.b, self.h, self.dv)

    def context_grad_buffer(self, t: int, b: int) -> Tensor:
        """Where the gradient of step t's context (b, C) should be written: the saved per-step
        buffer itself when the context is the single head's (no copy), else a fresh tensor."""
        if self.d_ctx_heads is not None and self.h == 1 and self.out_w is None:
            return self.d_ctx_heads[t, :b]
        return self.keys.new_empty(b, self.dv * self.h if self.out_w is None else self.out_w.shape[0])

    def _per_head(self, grad: Tensor) -> Tensor:  # (B, ...) of a head average -> (N, ...) per head
        return grad if self.h == 1 else (grad / self.h).repeat_interleave(self.h, 0)

    def backward(
        self, t: int, qp: Tensor, d_ctx: Tensor, d_alpha: Tensor | None, d_beta: Tensor | None, s: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Step t's gradients for its first b rows: d_ctx (b, C) (from :meth:`context_grad_buffer`),
        d_alpha (b, S), d_beta (b,) -> d_qp (b, H*Q), d_s (b, D) or None."""
        s_len, dtype, b = self.s, self.dtype, qp.shape[0]
        n = b * self.h
        if self.out_w is not None:
            self.d_out[t, :b] = d_ctx
            d_ctx = mm(d_ctx, self.out_w_mm, dtype)  # (b, H*dv)
        d_ch = d_ctx.reshape(n, 1, self.dv)
        if self.d_ctx_heads is not None and not (self.h == 1 and self.out_w is None):
            self.d_ctx_heads[t, :n] = d_ch[:, 0]
        qh = qp.to(dtype).reshape(n, 1, -1)
        d_w = torch.bmm(d_ch.to(self.mm), self.values_t[:n]).to(dtype)  # (n, 1, S)
        if self.kernels:
            from captioning.nn.kernels.attention import softmax_backward as fused

            d_e = torch.empty_like(d_w)
            fused(self.alpha_heads[t, :n], d_w.view(n, s_len), d_alpha, self.h, d_e.view(n, s_len))
            return self.acc.step(d_e, qh).reshape(b, -1), None
        a = self.alpha_heads[t, :n].unsqueeze(1)  # (n, 1, S)
        d_a = None if d_alpha is None else self._per_head(d_alpha).unsqueeze(1)
        if s is None:
            d_e = softmax_backward(a, d_w if d_a is None else d_w + d_a)  # masked cells -> 0
            return self.acc.step(d_e, qh).reshape(b, -1), None
        w = self.joint[t, :n].unsqueeze(1)  # (n, 1, S + 1)
        with torch.enable_grad():  # the sentinel position: a small map, autograd step by step
            q_, s_ = qh.detach().requires_grad_(True), s.detach().requires_grad_(True)
            # (views, not the leaves themselves: module hooks such as FlopCounterMode's refuse leaves here)
            kx, vx = self.sentinel_rows(s_.view_as(s_))
            ex = self.paired(q_.view_as(q_), kx, s_len)  # (N, 1)
        d_wx = (d_ch * vx.detach().to(dtype)).sum(-1, keepdim=True)  # (N, 1, 1)
        if d_beta is not None:
            d_wx = d_wx + self._per_head(d_beta).view(n, 1, 1)
        d_joint = softmax_backward(w, torch.cat([d_w, d_wx], -1))
        d_e = d_joint[..., :s_len] if d_a is None else d_joint[..., :s_len] + softmax_backward(a, d_a)
        d_ex, d_vx = d_joint[..., s_len], w[..., s_len:] * d_ch  # (N, 1), (N, 1, dv)
        self.d_ex[t, :b], self.d_vx[t, :b] = d_ex.view(b, self.h), d_vx.view(b, self.h, self.dv)
        d_q, d_s = torch.autograd.grad((ex, vx), (q_, s_), (d_ex.to(ex.dtype), d_vx.to(vx.dtype)), allow_unused=True)
        d_qh = self.acc.step(d_e, qh)
        if d_q is not None:
            d_qh = d_qh + d_q
        return d_qh.reshape(b, -1), d_s

    def finish(
        self,
        keys: Tensor,
        values: Tensor,
        need_values: bool,
        queries: Tensor,
        s_used: Tensor,
        sentinel_params: tuple,
    ) -> tuple:
        """After the last step: (d_keys, d_values, d_out_w, d_out_b, d_score_params,
        d_sentinel_params); queries (T, B, H*Q) and s_used (T, B, D) as the steps saw them."""
        d_keys, d_score = self.acc.finish()
        d_values = None
        if need_values:  # d V = sum_t w_t^T d ctx_t: one batched GEMM over the steps
            w = self.joint[..., : self.s] if self.sentinel else self.alpha_heads  # (T, N, S)
            assert self.d_ctx_heads is not None  # kept by begin_backward(need_values=True)
            d_values = torch.bmm(w.permute(1, 2, 0).to(self.mm), self.d_ctx_heads.transpose(0, 1).to(self.mm))
            d_values = d_values.reshape(self.value_shape).to(values.dtype)
        d_out_w = d_out_b = None
        if self.out_w is not None:
            flat = self.d_out.reshape(-1, self.d_out.shape[-1])
            d_out_w = mm(flat.t(), self.ctx_heads.reshape(-1, self.ctx_heads.shape[-1]).to(self.mm), self.dtype)
            d_out_b = None if self.out_b is None else flat.sum(0)
        d_sentinel: tuple[Tensor | None, ...] = (None,) * len(sentinel_params)
        trained = [p for p in sentinel_params if p.requires_grad]
        if self.sentinel and trained:  # the sentinel map's parameters: one call over all B*T rows
            with torch.enable_grad():
                kx, vx = self.sentinel_rows(s_used.reshape(-1, s_used.shape[-1]))
                ex = self.paired(queries.reshape(vx.shape[0], 1, -1).to(self.dtype), kx, self.s)
                pairs = [
                    (o, d.reshape(o.shape).to(o.dtype))
                    for o, d in ((ex, self.d_ex), (vx, self.d_vx))
                    if o.requires_grad
                ]  # a location score reads no parameter here
                grads = iter(
                    torch.autograd.grad([o for o, _ in pairs], trained, [d for _, d in pairs], allow_unused=True)
                )
            d_sentinel = tuple(next(grads) if p.requires_grad else None for p in sentinel_params)
        return d_keys.reshape(self.key_shape).to(keys.dtype), d_values, d_out_w, d_out_b, d_score, d_sentinel


def _no_sentinel(s: Tensor) -> tuple[Tensor, Tensor]:
    raise AssertionError("no sentinel in this recurrence")
