"""Where the decoder looks: query "previous" / "current" and the visual sentinel, with every
score function and multi-head, on the fused path, in teacher forcing, greedy and beam search."""

import itertools

import pytest
import torch

from captioning.nn.attention import SCORERS
from captioning.nn.image_decoder import ShowAttendTellDecoder
from captioning.nn.search import beam_search, greedy_search

from support.recurrence import assert_bf16_autocast_close_to_fp32, assert_fused_equals_plain, training_losses

V, C, S = 30, 12, 9
PAD, BOS, EOS = 0, 1, 2
VARIANTS = [("previous", False), ("previous", True), ("current", False), ("current", True)]


def _decoder(query, sentinel, score="additive", heads=1, **kw):
    torch.manual_seed(0)
    return ShowAttendTellDecoder(
        V,
        C,
        8,
        16,
        10,
        attention=score,
        num_heads=heads,
        dropout=0.0,
        max_positions=S,
        query=query,
        sentinel=sentinel,
        **kw,
    ).double()


def _mask(b=4):
    mask = torch.ones(b, S, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2] = False  # nothing to look at: all the weight goes to the sentinel (or nowhere)
    return mask


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("score", sorted(SCORERS))
@pytest.mark.parametrize("query,sentinel", VARIANTS)
def test_fused_recurrence_equals_plain_loop(query, sentinel, score, heads):
    dec = _decoder(query, sentinel, score, heads)
    feats, inputs = torch.randn(4, S, C, dtype=torch.double), torch.randint(0, V, (4, 6))
    assert_fused_equals_plain(dec, feats, inputs, _mask())


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("query,sentinel", VARIANTS)
def test_every_parameter_trains_through_the_fused_path(query, sentinel, gate):
    dec = _decoder(query, sentinel, gate=gate)
    feats, inputs = torch.randn(4, S, C, dtype=torch.double), torch.randint(0, V, (4, 6))
    assert_fused_equals_plain(dec, feats, inputs)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters())


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("score", ["additive", "general", "location"])
@pytest.mark.parametrize("query,sentinel", VARIANTS)
def test_teacher_forcing_equals_step_by_step(query, sentinel, score, heads):
    dec = _decoder(query, sentinel, score, heads).eval()
    feats, inputs = torch.randn(3, S, C, dtype=torch.double), torch.randint(0, V, (3, 7))
    mask = _mask(3)
    out = dec(feats, inputs, mask)  # the fused recurrence
    assert out.logits.shape == (3, 7, V) and out.alphas.shape == (3, 7, S)
    assert (out.betas is not None) == sentinel and (not sentinel or out.betas.shape == (3, 7))
    memory = dec.prepare_memory(feats, mask)
    state = dec.init_state(memory)
    for t in range(7):
        step = dec.step(inputs[:, t], state, memory)
        state = step.state
        torch.testing.assert_close(step.logits, out.logits[:, t])
        torch.testing.assert_close(step.alpha, out.alphas[:, t])
        if sentinel:
            torch.testing.assert_close(step.beta, out.betas[:, t])
        else:
            assert step.beta is None


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("query,sentinel", VARIANTS)
def test_beam_of_one_equals_greedy_and_results_carry_betas(query, sentinel, heads):
    dec = _decoder(query, sentinel, heads=heads).eval()
    feats = torch.randn(4, S, C, dtype=torch.double)
    memory = dec.prepare_memory(feats, _mask())
    g = greedy_search(dec, memory, 4, BOS, EOS, PAD, max_length=10)
    b = beam_search(dec, memory, 4, BOS, EOS, PAD, beam_size=1, max_length=10)
    assert torch.equal(g.tokens, b.tokens)
    torch.testing.assert_close(g.scores, b.scores)
    torch.testing.assert_close(g.alphas, b.alphas)
    wide = beam_search(dec, memory, 4, BOS, EOS, PAD, beam_size=3, max_length=10)
    for result in (g, b, wide):
        if sentinel:
            assert result.betas.shape == result.tokens.shape
            torch.testing.assert_close(result.betas, g.betas if result is b else result.betas)
            assert torch.all((result.betas >= 0) & (result.betas <= 1))
        else:
            assert result.betas is None


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("score", sorted(SCORERS))
@pytest.mark.parametrize("query", ["previous", "current"])
def test_sentinel_weights_image_alphas_and_context(query, score, heads):
    """beta in [0, 1]; alphas are the image weights renormalised (rows sum to 1, masked cells 0);
    the context is beta * sentinel + (1 - beta) * alphas @ values."""
    dec = _decoder(query, True, score, heads).eval()
    feats, mask = torch.randn(4, S, C, dtype=torch.double), _mask()
    out = dec(feats, torch.randint(0, V, (4, 5)), mask)
    assert torch.all((out.betas >= 0) & (out.betas <= 1))
    sums = out.alphas.sum(-1)
    torch.testing.assert_close(sums[[0, 1, 3]], torch.ones(3, 5, dtype=torch.double))
    assert torch.all(out.alphas[1, :, 5:] == 0) and torch.all(out.alphas[2] == 0)
    torch.testing.assert_close(out.betas[2], torch.ones(5, dtype=torch.double))  # only the sentinel to look at
    assert not torch.isnan(out.logits).any()
    # The context identity, through the layer (single head: the weights are those of one softmax).
    if heads == 1:
        layer = dec.attention
        memory = layer.prepare(feats, feats, mask)
        extra = layer.prepare(torch.randn(4, 1, C, dtype=torch.double))
        res = layer.attend(torch.randn(4, 1, layer.query_dim, dtype=torch.double), memory, extra)
        expected = res.beta[..., None] * extra.values + (1 - res.beta[..., None]) * res.alpha @ feats
        torch.testing.assert_close(res.context, expected)


def test_sentinel_gradcheck():
    torch.manual_seed(0)
    for query, score in itertools.product(["previous", "current"], ["additive", "location"]):
        dec = ShowAttendTellDecoder(
            7, 4, 3, 4, 4, attention=score, dropout=0.0, max_positions=3, query=query, sentinel=True
        ).double()
        feats = torch.randn(2, 3, 4, dtype=torch.double, requires_grad=True)
        inputs = torch.randint(0, 7, (2, 3))

        def f(x, dec=dec, inputs=inputs):
            out = dec(x, inputs)
            return out.logits.sum() + out.alphas.pow(2).sum() + out.betas.pow(2).sum()

        assert torch.autograd.gradcheck(f, (feats,))


def test_options_are_checked():
    with pytest.raises(ValueError, match="query"):
        ShowAttendTellDecoder(V, C, query="sideways")
    with pytest.raises(ValueError, match="sentinel"):
        ShowAttendTellDecoder(V, C, attention="none", sentinel=True)
    dec = ShowAttendTellDecoder(V, C, 8, 16, 10, attention="location", max_positions=S, sentinel=True)
    assert dec.attention.scorer.max_positions == S + 1  # one more position: the sentinel's


def _toy_task(n=48, t=4, seed=0):
    """Word t names which of 4 channel groups is largest in cell t: learnable only by looking."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, S, C, generator=g)
    words = 3 + feats[:, :t, :4].argmax(-1)  # (n, t)
    captions = torch.cat([torch.full((n, 1), BOS), words, torch.full((n, 1), EOS)], 1)
    return feats, captions


@pytest.mark.parametrize("query,sentinel", VARIANTS)
def test_each_variant_learns_a_toy_task(query, sentinel):
    torch.manual_seed(0)
    dec = ShowAttendTellDecoder(V, C, 16, 32, 16, dropout=0.0, max_positions=S, query=query, sentinel=sentinel)
    feats, captions = _toy_task()
    losses = training_losses(dec, feats, captions, steps=40, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses[::8]


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("query,sentinel", VARIANTS[1:])
def test_bf16_autocast_training_and_beam_search_stay_close_to_fp32(query, sentinel, heads):
    dec = _decoder(query, sentinel, heads=heads).float()
    feats, inputs = torch.randn(4, S, C), torch.randint(0, V, (4, 6))
    assert_bf16_autocast_close_to_fp32(dec, feats, inputs)
    dec.eval()
    with torch.no_grad():
        fp32 = beam_search(dec, dec.prepare_memory(feats), 4, BOS, EOS, PAD, beam_size=3, max_length=8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = beam_search(dec, dec.prepare_memory(feats), 4, BOS, EOS, PAD, beam_size=3, max_length=8)
    torch.testing.assert_close(bf16.scores, fp32.scores, atol=0.1, rtol=0.02)
    if sentinel:
        assert bf16.betas.dtype == torch.float32 and torch.all((bf16.betas >= 0) & (bf16.betas <= 1))


@pytest.mark.parametrize("padding", ["shrink", "mask"])
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("score", sorted(SCORERS))
@pytest.mark.parametrize("query,sentinel", VARIANTS)
def test_skipping_padding_steps_gives_the_full_loops_outputs_and_gradients(query, sentinel, score, heads, padding):
    """Teacher forcing with ``steps`` skips each row's padding steps, either by running each row
    only for its real words (``shrink``: rows sorted by length inside) or by masking them
    (``mask``: every row runs, no host sync): the real positions and every gradient of a loss
    over them are those of the plain loop over all T steps; padding positions come out as zeros."""
    dec = _decoder(query, sentinel, score, heads, padding=padding)
    b, t = 6, 7
    g = torch.Generator().manual_seed(2)
    feats, inputs = torch.randn(b, S, C, dtype=torch.double, generator=g), torch.randint(0, V, (b, t), generator=g)
    steps = torch.tensor([3, 7, 0, 5, 1, 7])  # unsorted, a full row, an empty one
    real = torch.arange(t)[None] < steps[:, None]  # (B, T)
    mask = torch.ones(b, S, dtype=torch.bool)
    mask[3, 4:] = False
    results = []
    for fused, given in ((True, steps), (False, None)):
        dec.fused = fused
        dec.zero_grad()
        f = feats.clone().requires_grad_(True)
        out = dec(f, inputs, mask, steps=given)
        weights = torch.Generator().manual_seed(1)
        loss = sum(
            (x * torch.randn(x.shape, generator=weights, dtype=x.dtype) * real.view(b, t, *[1] * (x.dim() - 2))).sum()
            for x in out
            if x is not None
        )
        loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}, f.grad))
    dec.fused = True
    (f_out, f_grads, f_feat), (p_out, p_grads, p_feat) = results
    for name, got, want in zip(p_out._fields, f_out, p_out):
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got[real], want[real], msg=lambda m, name=name: f"{name}: {m}")
    assert (f_out.alphas[~real] == 0).all() and (f_out.betas is None or (f_out.betas[~real] == 0).all())
    assert f_grads.keys() == p_grads.keys()
    for name in p_grads:
        torch.testing.assert_close(f_grads[name], p_grads[name], msg=lambda m, name=name: f"gradient of {name}: {m}")
    torch.testing.assert_close(f_feat, p_feat)
