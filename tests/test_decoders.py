"""Show-Attend-Tell decoder: teacher forcing agrees with step-by-step decoding; options work."""

import pytest
import torch

from captioning.attention import SCORERS
from captioning.decoders import ShowAttendTellDecoder

V, C, S = 40, 24, 16


def _decoder(**kw):
    args = dict(embed_dim=12, decoder_dim=20, attention_dim=16, dropout=0.0, max_positions=S)
    args.update(kw)
    return ShowAttendTellDecoder(V, C, **args).double().eval()


@pytest.mark.parametrize("attention,heads", [("additive", 1), ("general", 1), ("scaled_dot", 4), ("none", 1)])
def test_teacher_forcing_equals_step_by_step(attention, heads):
    dec = _decoder(attention=attention, num_heads=heads)
    feats = torch.randn(3, S, C, dtype=torch.double)
    inputs = torch.randint(0, V, (3, 7))
    out = dec(feats, inputs)
    memory = dec.prepare_memory(feats)
    state = dec.init_state(memory)
    for t in range(7):
        logits, alpha, state = dec.step(inputs[:, t], state, memory)
        torch.testing.assert_close(logits, out.logits[:, t])
        torch.testing.assert_close(alpha, out.alphas[:, t])


@pytest.mark.parametrize("score", sorted(SCORERS))
def test_every_score_function_trains(score):
    dec = _decoder(attention=score).float().train()
    feats = torch.randn(4, S, C)
    captions = torch.randint(3, V, (4, 6))
    out = dec(feats, captions[:, :-1])
    loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), captions[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None for n, p in dec.named_parameters() if p.requires_grad)
    torch.testing.assert_close(out.alphas.sum(-1), torch.ones(4, 5))


def test_attention_weights_follow_the_query():
    """Alphas come from the state: two different images give different attention maps."""
    dec = _decoder()
    feats = torch.randn(2, S, C, dtype=torch.double)
    out = dec(feats, torch.randint(0, V, (2, 3)))
    assert not torch.allclose(out.alphas[0], out.alphas[1])


def test_no_attention_baseline_uses_only_the_mean_feature():
    dec = _decoder(attention="none")
    assert dec.attention is None and dec.gate is None
    feats = torch.randn(2, S, C, dtype=torch.double)
    shuffled = feats[:, torch.randperm(S)]  # same mean, different layout
    inputs = torch.randint(0, V, (2, 5))
    torch.testing.assert_close(dec(feats, inputs).logits, dec(shuffled, inputs).logits)
    torch.testing.assert_close(dec(feats, inputs).alphas, torch.full((2, 5, S), 1.0 / S, dtype=torch.double))


def test_gate_can_be_switched_off():
    assert _decoder(gate=False).gate is None
    assert _decoder(gate=True).gate is not None
