"""The fused recurrence's padding schedules and its fused-kernel path (the one CUDA runs), against
the plain autograd loop. (Every score x heads x query x sentinel under both schedules:
tests/nn/test_decoder_core.py.)"""

import itertools

import pytest
import torch

from captioning.nn import kernels
from captioning.nn.image_decoder import ShowAttendTellDecoder
from captioning.nn.recurrence import Schedule, make_schedule, resolve_padding

V, C, S = 30, 12, 9


def test_schedules_say_which_cells_are_real():
    steps = torch.tensor([3, 5, 0, 5])
    mask = make_schedule(steps, 4, 5, "mask")
    assert mask.order is None and mask.active is None and not mask.padded
    assert mask.real.tolist() == [[s > t for s in (3, 5, 0, 5)] for t in range(5)]  # (T, B)
    shrink = make_schedule(steps, 4, 5, "shrink")
    assert shrink.order.tolist() == [1, 3, 0, 2] and shrink.active == (3, 3, 3, 2, 2) and shrink.padded
    assert make_schedule(torch.tensor([5, 5]), 2, 5, "shrink") == Schedule()  # no padding: nothing to skip
    assert make_schedule(None, 2, 5, "mask") == Schedule()
    with pytest.raises(ValueError, match="one count per row"):
        make_schedule(torch.tensor([1, 2, 3]), 2, 5, "mask")


def test_auto_padding_shrinks_on_cpus_and_masks_on_accelerators():
    assert resolve_padding("auto", torch.device("cpu")) == "shrink"
    assert resolve_padding("auto", torch.device("cuda")) == "mask"
    assert resolve_padding("mask", torch.device("cpu")) == "mask"
    with pytest.raises(ValueError, match="padding must be one of"):
        resolve_padding("squeeze", torch.device("cpu"))
    with pytest.raises(ValueError, match="padding must be one of"):
        ShowAttendTellDecoder(V, C, padding="squeeze")


def pairwise_cover(cases: list[tuple]) -> list[tuple]:
    """A few of ``cases`` in which every pair of values of any two factors still occurs
    (greedy: each pick covers the most pairs not yet covered)."""

    def pairs(case: tuple) -> set:
        return {(i, case[i], j, case[j]) for i, j in itertools.combinations(range(len(case)), 2)}

    missing, chosen = set().union(*map(pairs, cases)), []
    while missing:
        best = max(cases, key=lambda case: len(pairs(case) & missing))
        chosen.append(best)
        missing -= pairs(best)
    return chosen


CASES = [
    (q, s, g, h, score, dtype)
    for q, s, g, h, score, dtype in itertools.product(
        ["previous", "current"],
        [False, True],
        [True, False],
        [1, 2],
        ["additive", "general"],
        [torch.float64, torch.float32],
    )
    if not (s and h == 2) and not (dtype == torch.float64 and torch.cuda.is_available())
]
# On a GPU every combination (float32; float64 runs only through the interpreter). Triton's
# interpreter takes about a second a case on a CPU: there every pair of settings still meets.
KERNEL_CASES = CASES if torch.cuda.is_available() else pairwise_cover(CASES)


@pytest.mark.skipif(
    not kernels.triton_available() or not (torch.cuda.is_available() or kernels.interpreting()),
    reason="Triton is not installed (or, without a GPU, TRITON_INTERPRET is not 1)",
)
@pytest.mark.parametrize(
    "query,sentinel,gate,heads,score,dtype", KERNEL_CASES, ids=lambda v: str(v).removeprefix("torch.")
)
def test_the_kernel_path_equals_the_plain_loop(query, sentinel, gate, heads, score, dtype):
    """The path CUDA runs (fused kernels for the LSTM update, softmax + context + gate and the
    additive score; padding masked): outputs at real positions and every gradient."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    dec = ShowAttendTellDecoder(
        V,
        C,
        8,
        16,
        10,
        attention=score,
        num_heads=heads,
        gate=gate,
        dropout=0.0,
        max_positions=S,
        query=query,
        sentinel=sentinel,
        padding="mask",
    ).to(device, dtype)
    g = torch.Generator().manual_seed(2)
    b, t = 5, 6
    feats = torch.randn(b, S, C, generator=g, dtype=dtype).to(device)
    inputs = torch.randint(0, V, (b, t), generator=g).to(device)
    steps = torch.tensor([3, 6, 0, 5, 1], device=device)
    real = torch.arange(t, device=device)[None] < steps[:, None]
    mask = torch.ones(b, S, dtype=torch.bool, device=device)
    mask[3, 4:] = False
    results = []
    for fused in (True, False):
        dec.fused = fused
        dec.zero_grad()
        f = feats.clone().requires_grad_(True)
        with kernels.forced(fused):
            out = dec(f, inputs, mask, steps=steps if fused else None)
            w = torch.Generator().manual_seed(1)
            loss = sum(
                (
                    x
                    * torch.randn(x.shape, generator=w, dtype=x.dtype).to(device)
                    * real.view(b, t, *[1] * (x.dim() - 2))
                ).sum()
                for x in out
                if x is not None
            )
            loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}, f.grad))
    (f_out, f_grads, f_feat), (p_out, p_grads, p_feat) = results
    tol = {} if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    for name, got, want in zip(p_out._fields, f_out, p_out):
        if want is not None:
            torch.testing.assert_close(got[real], want[real], msg=lambda m, name=name: f"{name}: {m}", **tol)
    assert torch.all(f_out.alphas[~real] == 0)
    assert f_grads.keys() == p_grads.keys()
    for name in p_grads:
        torch.testing.assert_close(
            f_grads[name], p_grads[name], msg=lambda m, name=name: f"gradient of {name}: {m}", **tol
        )
    torch.testing.assert_close(f_feat, p_feat, **tol)
