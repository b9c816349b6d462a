"""The speed paths give what the plain paths give: the fused recurrence (outputs AND every
gradient) for every score and multi-head, beam search without copying the grid, the scorers'
no-graph scores in search. (Query styles and the sentinel: tests/nn/test_decoder_core.py.)"""

import pytest
import torch

from captioning.nn.attention import SCORERS, Attention
from captioning.nn.image_decoder import ShowAttendTellDecoder
from captioning.nn.search import beam_search, greedy_search

from support.recurrence import assert_bf16_autocast_close_to_fp32, assert_fused_equals_plain

V, C, S = 30, 12, 9
PAD, BOS, EOS = 0, 1, 2
SCORES = sorted(SCORERS)


def _decoder(**kw):
    torch.manual_seed(0)
    return ShowAttendTellDecoder(V, C, 8, 16, 10, dropout=0.0, max_positions=S, **kw).double()


def _mask(b=4):
    mask = torch.ones(b, S, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2] = False  # fully masked row: zero attention, no NaN, in both paths
    return mask


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("score", SCORES)
def test_fused_recurrence_matches_plain_loop_for_every_score(score, heads):
    dec = _decoder(attention=score, num_heads=heads)
    feats, inputs = torch.randn(4, S, C, dtype=torch.double), torch.randint(0, V, (4, 6))
    assert_fused_equals_plain(dec, feats, inputs, _mask())


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_recurrence_with_and_without_gate_and_mask(gate, with_mask):
    dec = _decoder(gate=gate)
    feats, inputs = torch.randn(4, S, C, dtype=torch.double), torch.randint(0, V, (4, 6))
    assert_fused_equals_plain(dec, feats, inputs, _mask() if with_mask else None)
    assert len({n for n, p in dec.named_parameters() if p.grad is not None}) == len(list(dec.parameters()))


@pytest.mark.parametrize("score,heads", [(s, 1) for s in SCORES] + [("additive", 2), ("scaled_dot", 2)])
def test_fused_recurrence_passes_gradcheck(score, heads):
    torch.manual_seed(0)
    dec = ShowAttendTellDecoder(7, 4, 3, 4, 4, attention=score, num_heads=heads, dropout=0.0, max_positions=3).double()
    assert dec.uses_fused_recurrence
    feats = torch.randn(2, 3, 4, dtype=torch.double, requires_grad=True)
    inputs = torch.randint(0, 7, (2, 3))

    def f(x):
        out = dec(x, inputs)
        return out.logits.sum() + out.alphas.pow(2).sum()

    assert torch.autograd.gradcheck(f, (feats,))


def test_fused_recurrence_under_bf16_autocast_stays_close_to_fp32():
    assert_bf16_autocast_close_to_fp32(_decoder().float(), torch.randn(4, S, C), torch.randint(0, V, (4, 6)))


class _NoExpand:
    """The same decoder seen through the bare step interface: search copies memory per beam."""

    def __init__(self, dec):
        self.prepare_memory, self.init_state, self.step = dec.prepare_memory, dec.init_state, dec.step


@pytest.mark.parametrize(
    "attention,heads", [("additive", 1), ("general", 1), ("none", 1), ("additive", 2), ("content", 2)]
)
def test_beam_search_without_copying_the_grid_equals_copying(attention, heads):
    dec = _decoder(attention=attention, num_heads=heads).eval()
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


def test_search_scores_in_chunks_equal_the_attention_layer():
    torch.manual_seed(0)
    layer = Attention(16, 12, attention_dim=10, score="additive").double()
    keys = torch.randn(5, S, 12, dtype=torch.double)
    mask = torch.ones(5, S, dtype=torch.bool)
    mask[0, 3:] = False
    mask[4] = False
    memory = layer.prepare(keys, keys, mask)
    queries = torch.randn(5, 3, 16, dtype=torch.double)  # K = 3 queries per item
    expected = layer.attend(queries, memory)
    scratch = layer.new_scratch(memory, 3)[:2]  # 2 items at a time: 3 chunks, the last partial
    with torch.no_grad():
        got = layer.attend(queries, memory, scratch=scratch)
    torch.testing.assert_close(got.context, expected.context)
    torch.testing.assert_close(got.alpha, expected.alpha)
    assert torch.all(got.alpha[4] == 0) and torch.all(got.alpha[0, :, 3:] == 0)


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
