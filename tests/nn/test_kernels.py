"""The fused GPU kernels compute what the plain PyTorch path computes: the LSTM update and its
backward, softmax + context (+ gate) and the softmax/gate backward, the additive score and its
backward. On a machine with CUDA they run on the GPU; elsewhere through Triton's interpreter."""

import pytest
import torch

from captioning.nn import kernels

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not kernels.triton_available() or not (CUDA or kernels.interpreting()),
    reason="Triton is not installed (or, without a GPU, TRITON_INTERPRET is not 1)",
)
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32] + ([] if CUDA else [torch.float64])


def _tol(dtype):
    return {} if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sentinel", [False, True])
def test_lstm_cell_and_its_backward_equal_the_plain_maths(sentinel, dtype):
    from captioning.nn.kernels.lstm import cell_backward
    from captioning.nn.recurrence import cell

    g = torch.Generator().manual_seed(0)
    m, d = 5, 20
    width = (5 if sentinel else 4) * d

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=dt).to(DEVICE)

    x, r, z, c = rand(m, width), rand(m, width, dt=torch.bfloat16), rand(m, width), rand(m, d)
    outs = {}
    for name, fused in (("plain", False), ("kernel", True)):
        act, c_out, h, s = (torch.empty(m, n, dtype=dtype, device=DEVICE) for n in (width, d, d, d))
        h_mm = torch.empty(m, d, dtype=torch.bfloat16, device=DEVICE)
        cell.cell_forward(x, r, z, c, act, c_out, h, h_mm, s if sentinel else None, kernels=fused)
        outs[name] = (act, c_out, h, s if sentinel else None, h_mm)
    for got, want in zip(outs["kernel"], outs["plain"]):
        if want is not None:  # h in bf16 (the next GEMM's input): one bf16 rounding apart at most
            tol = dict(atol=1e-2, rtol=1e-2) if got.dtype == torch.bfloat16 else _tol(dtype)
            torch.testing.assert_close(got.float(), want.float(), **tol)
    act, c_out = outs["plain"][:2]
    dh, d_out, dc, ds = rand(m, d), rand(m, d), rand(m, d), rand(m, d) if sentinel else None
    grads = {}
    for name, fused in (("plain", False), ("kernel", True)):
        buffer = torch.zeros(m, width + 3, dtype=dtype, device=DEVICE)  # a slice of a wider buffer, as in the loop
        dc_prev = torch.empty(m, d, dtype=dtype, device=DEVICE)
        (cell_backward if fused else _plain_backward)(
            act, c_out, c, dh, d_out, dc.clone(), ds, buffer[:, 1 : width + 1], dc_prev
        )
        grads[name] = (buffer, dc_prev)
    for got, want in zip(grads["kernel"], grads["plain"]):
        torch.testing.assert_close(got, want, **_tol(dtype))


def _plain_backward(*args):
    from captioning.nn.recurrence import cell

    cell.cell_backward(*args, kernels=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_mask,gate", [(False, False), (True, True), (True, False)])
def test_softmax_context_and_backward_equal_the_plain_maths(with_mask, gate, dtype):
    from captioning.nn.attention import masked_softmax, softmax_backward
    from captioning.nn.kernels.attention import gate_backward, softmax_context
    from captioning.nn.kernels.attention import softmax_backward as fused_backward

    g = torch.Generator().manual_seed(1)
    n, s, dv = 6, 45, 150  # several position chunks and value blocks, both with a ragged end
    e = torch.randn(n, s, generator=g, dtype=dtype).to(DEVICE)
    values = torch.randn(n, s, dv, generator=g, dtype=dtype).to(DEVICE)
    mask = (torch.rand(n, s, generator=g) > 0.3).to(DEVICE) if with_mask else None
    if mask is not None:
        mask[2] = False  # a fully masked row: zeros, not NaN
    gate_pre = torch.randn(n, dv, generator=g, dtype=dtype).to(DEVICE)
    alpha = torch.full((n, s), float("nan"), dtype=dtype, device=DEVICE)
    ctx, z = torch.empty(n, dv, dtype=dtype, device=DEVICE), torch.empty(n, dv, dtype=dtype, device=DEVICE)
    softmax_context(e, mask, values, alpha, ctx, gate_pre if gate else None, z if gate else None)
    want_alpha = masked_softmax(e, mask)
    want_ctx = torch.bmm(want_alpha.unsqueeze(1), values)[:, 0]
    torch.testing.assert_close(alpha, want_alpha, **_tol(dtype))
    torch.testing.assert_close(ctx, want_ctx, **_tol(dtype))
    if gate:
        torch.testing.assert_close(z, torch.sigmoid(gate_pre) * want_ctx, **_tol(dtype))
    if mask is not None:
        assert torch.all(alpha[~mask] == 0) and torch.all(ctx[2] == 0)
    d_w = torch.randn(n, s, generator=g, dtype=dtype).to(DEVICE)
    d_alpha = torch.randn(n // 2, s, generator=g, dtype=dtype).to(DEVICE)  # two heads per item
    d_e = torch.empty(n, s, dtype=dtype, device=DEVICE)
    fused_backward(want_alpha, d_w, d_alpha, 2, d_e)
    torch.testing.assert_close(
        d_e, softmax_backward(want_alpha, d_w + (d_alpha / 2).repeat_interleave(2, 0)), **_tol(dtype)
    )
    dz, extra = (
        torch.randn(n, dv, generator=g, dtype=dtype).to(DEVICE),
        torch.randn(n, dv, generator=g, dtype=dtype).to(DEVICE),
    )
    d_ctx, wide = torch.empty(n, dv, dtype=dtype, device=DEVICE), torch.zeros(n, dv + 8, dtype=dtype, device=DEVICE)
    gate_backward(dz, extra, want_ctx, gate_pre, d_ctx, wide[:, 4 : 4 + dv])
    sig = torch.sigmoid(gate_pre)
    torch.testing.assert_close(d_ctx, (dz + extra) * sig, **_tol(dtype))
    torch.testing.assert_close(wide[:, 4 : 4 + dv], (dz + extra) * want_ctx * sig * (1 - sig), **_tol(dtype))
    assert torch.all(wide[:, :4] == 0) and torch.all(wide[:, 4 + dv :] == 0)  # nothing written outside the slice


@pytest.mark.parametrize("dtype", DTYPES)
def test_additive_score_and_its_backward_equal_the_scorer(dtype):
    from captioning.nn.scores import AdditiveScorer

    torch.manual_seed(0)
    scorer = AdditiveScorer(7, 11, 70).to(DEVICE, dtype)
    n, s = 5, 40
    keys = scorer.prepare_keys(torch.randn(n, s, 11, dtype=dtype, device=DEVICE)).detach()
    qp = torch.randn(n, 3, 70, dtype=dtype, device=DEVICE)  # three queries per item (beam search)
    with torch.no_grad(), kernels.forced(True):
        got = scorer.scores_into(qp, keys)
    torch.testing.assert_close(got, scorer.scores(qp, keys).detach(), **_tol(dtype))
    plain = AdditiveScorer.Backward(keys, scorer.v.weight.view(-1))
    fused = AdditiveScorer.KernelBackward(keys, scorer.v.weight.view(-1))
    g = torch.Generator().manual_seed(3)
    for items in (5, 3):  # a batch that shrinks, as rows end
        d_e = torch.randn(items, 1, s, generator=g, dtype=dtype).to(DEVICE)
        q = torch.randn(items, 1, 70, generator=g, dtype=dtype).to(DEVICE)
        torch.testing.assert_close(fused.step(d_e, q), plain.step(d_e, q), **_tol(dtype))
    (d_keys, (d_v,)), (want_keys, (want_v,)) = fused.finish(), plain.finish()
    torch.testing.assert_close(d_keys, want_keys, **_tol(dtype))
    torch.testing.assert_close(d_v, want_v, atol=1e-4 if dtype == torch.float32 else 1e-12, rtol=1e-4)


def test_forcing_the_kernels_on_a_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if CUDA:
        pytest.skip("with a GPU the kernels may be forced")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"), kernels.forced(True):
        pass
