"""The speed paths give what the plain paths give: fused recurrence (outputs AND gradients),
beam search without copying the grid, scratch-buffer attention."""

import pytest
import torch

from captioning.attention import Attention
from captioning.decoders import ShowAttendTellDecoder
from captioning.sat_recurrence import additive_attention_into
from captioning.search import beam_search, greedy_search

V, C, S = 30, 12, 9
PAD, BOS, EOS = 0, 1, 2



def _decoder(**kw):
    torch.manual_seed(0)
    return ShowAttendTellDecoder(V, C, 8, 16, 10, dropout=0.0, max_positions=S, **kw).double()


def _run(dec, feats, inputs, mask, fused):
    dec.fused = fused
    dec.zero_grad()
    feats = feats.detach().clone().requires_grad_(True)
    out = dec(feats, inputs, mask)
    g = torch.Generator().manual_seed(1)
    # Weights on both outputs so every path of the backward is exercised (logits and alphas).
    loss = (out.logits * torch.randn(out.logits.shape, generator=g, dtype=torch.double)).sum() \
        + (out.alphas * torch.randn(out.alphas.shape, generator=g, dtype=torch.double)).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}
    return out, grads, feats.grad


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_recurrence_matches_plain_loop_outputs_and_gradients(gate, with_mask):
    dec = _decoder(gate=gate)
    assert dec.uses_fused_recurrence
    feats, inputs = torch.randn(4, S, C, dtype=torch.double), torch.randint(0, V, (4, 6))
    mask = None
    if with_mask:
        mask = torch.ones(4, S, dtype=torch.bool)
        mask[1, 5:] = False
        mask[2] = False  # fully masked row: zero attention, no NaN, in both paths
    fused_out, fused_grads, fused_feat_grad = _run(dec, feats, inputs, mask, fused=True)
    plain_out, plain_grads, plain_feat_grad = _run(dec, feats, inputs, mask, fused=False)
    torch.testing.assert_close(fused_out.logits, plain_out.logits)
    torch.testing.assert_close(fused_out.alphas, plain_out.alphas)
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) == len(list(dec.parameters()))
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], msg=f"gradient of {name}")
    torch.testing.assert_close(fused_feat_grad, plain_feat_grad)  # a fine-tuned encoder gets the same gradient


def test_fused_recurrence_passes_gradcheck():
    torch.manual_seed(0)
    dec = ShowAttendTellDecoder(7, 4, 3, 5, 4, dropout=0.0).double()
    feats = torch.randn(2, 3, 4, dtype=torch.double, requires_grad=True)
    inputs = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(lambda f: dec(f, inputs).logits.sum() + dec(f, inputs).alphas.pow(2).sum(),
                                    (feats,))


def test_fused_recurrence_under_bf16_autocast_stays_close_to_fp32():
    dec = _decoder().float()
    feats, inputs = torch.randn(4, S, C), torch.randint(0, V, (4, 6))
    ref = dec(feats, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = dec(feats, inputs)
        low.logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dec.parameters())
    torch.testing.assert_close(low.logits.float(), ref.logits, atol=0.05, rtol=0.05)
    torch.testing.assert_close(low.alphas.float(), ref.alphas, atol=0.02, rtol=0.05)


class _NoExpand:
    """The same decoder seen through the bare step interface: search copies memory per beam."""

    def __init__(self, dec):
        self.prepare_memory, self.init_state, self.step = dec.prepare_memory, dec.init_state, dec.step


@pytest.mark.parametrize("attention", ["additive", "general", "none"])
def test_beam_search_without_copying_the_grid_equals_copying(attention):
    dec = _decoder(attention=attention).eval()
    feats = torch.randn(5, S, C, dtype=torch.double)
    mask = torch.ones(5, S, dtype=torch.bool)
    mask[3, 4:] = False
    fast = beam_search(dec, dec.prepare_memory(feats, mask), 5, BOS, EOS, PAD, beam_size=3, max_length=12)
    plain = _NoExpand(dec)
    slow = beam_search(plain, plain.prepare_memory(feats, mask), 5, BOS, EOS, PAD, beam_size=3, max_length=12)
    assert torch.equal(fast.tokens, slow.tokens) and torch.equal(fast.lengths, slow.lengths)
    torch.testing.assert_close(fast.scores, slow.scores)
    torch.testing.assert_close(fast.alphas, slow.alphas)
    g_fast = greedy_search(dec, dec.prepare_memory(feats, mask), 5, BOS, EOS, PAD, max_length=12)
    g_slow = greedy_search(plain, plain.prepare_memory(feats, mask), 5, BOS, EOS, PAD, max_length=12)
    assert torch.equal(g_fast.tokens, g_slow.tokens)
    torch.testing.assert_close(g_fast.scores, g_slow.scores)


def test_scratch_attention_equals_the_attention_layer_in_chunks():
    torch.manual_seed(0)
    layer = Attention(16, 12, attention_dim=10, score="additive").double()
    keys = torch.randn(5, S, 12, dtype=torch.double)
    mask = torch.ones(5, S, dtype=torch.bool)
    mask[0, 3:] = False
    mask[4] = False
    memory = layer.prepare(keys, keys, mask)
    queries = torch.randn(5, 3, 16, dtype=torch.double)  # K = 3 queries per item
    expected_ctx, expected_alpha = layer(queries, memory)
    scratch = torch.empty(2, 3, S, 10, dtype=torch.double)  # 2 items at a time: 3 chunks, the last partial
    ctx, alpha = additive_attention_into(layer.scorer, queries, memory.keys, memory.values, mask, scratch)
    torch.testing.assert_close(ctx, expected_ctx)
    torch.testing.assert_close(alpha, expected_alpha)
    assert torch.all(alpha[4] == 0) and torch.all(alpha[0, :, 3:] == 0)


def test_beam_search_under_bf16_autocast_matches_fp32_closely():
    dec = _decoder().float().eval()
    feats = torch.randn(4, S, C)
    with torch.no_grad():
        ref = beam_search(dec, dec.prepare_memory(feats), 4, BOS, EOS, PAD, beam_size=3, max_length=8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = beam_search(dec, dec.prepare_memory(feats), 4, BOS, EOS, PAD, beam_size=3, max_length=8)
    assert low.alphas.dtype == torch.float32
    torch.testing.assert_close(low.alphas.sum(-1), torch.ones_like(low.alphas.sum(-1)))
    torch.testing.assert_close(low.scores, ref.scores, atol=0.1, rtol=0.02)
