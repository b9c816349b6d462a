"""Show-Attend-Tell decoder: teacher forcing agrees with step-by-step decoding; options work."""

import pytest
import torch

from captioning.nn.attention import SCORERS
from captioning.nn.decoder_state import DecoderMemory, DecoderState
from captioning.nn.image_decoder import ShowAttendTellDecoder
from captioning.nn.search import ExpandsMemory, StepDecoder, StepOutput, beam_search

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
        logits, alpha, state, beta = dec.step(inputs[:, t], state, memory)
        assert beta is None
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


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("score", sorted(SCORERS))
def test_attention_follows_the_decoder_state(score, heads):
    """One image, two different first words: step 0 attends with the same (initial) state, so
    the same map; from step 1 the states differ and so must the maps. A decoder whose attention
    ignored its query would give both items the same maps at every step (checked below)."""
    dec = _decoder(attention=score, num_heads=heads)
    feats = torch.randn(1, S, C, dtype=torch.double).expand(2, S, C)
    inputs = torch.tensor([[5, 9, 9, 9], [6, 9, 9, 9]])

    def alphas():
        fused = dec(feats, inputs).alphas
        dec.fused = False
        plain = dec(feats, inputs).alphas
        dec.fused = True
        torch.testing.assert_close(fused, plain)
        return plain

    a = alphas()
    torch.testing.assert_close(a[0, 0], a[1, 0])
    assert (a[0, 1:] - a[1, 1:]).abs().amax(-1).min() > 1e-6, "attention did not follow the state"
    # The assertion above can fail: the same decoder with its query zeroed gives equal maps.
    project = dec.attention._project
    dec.attention._project = lambda q: project(torch.zeros_like(q))
    dec.fused = False
    blind = dec(feats, inputs).alphas
    torch.testing.assert_close(blind[0], blind[1])


# Recorded from the implementation before the scorer hooks (commit 63e9f6c), float64: the
# default decoder (additive, query "previous", no sentinel) must keep giving exactly these.
GOLDEN_LOGITS = [
    0.03291766612,
    -0.004365257413,
    -0.012264461722,
    0.033450885375,
    -0.018620068065,
    -0.00373002976,
    0.033497731828,
    -0.020699593309,
    -0.003451137878,
    0.033235714674,
    -0.031530595376,
    -0.006045716036,
    0.033258339358,
    -0.034909707763,
    -0.00797779076,
]
GOLDEN_ALPHAS = [
    0.127869251562,
    0.097456167163,
    0.104482917723,
    0.101483481635,
    0.148800749081,
    0.093676166269,
    0.122210764609,
    0.096618362791,
    0.107402139166,
]
GOLDEN_GRAD_SUMS = {
    "attention.scorer.key_proj.weight": -0.017347048403,
    "attention.scorer.key_proj.bias": 0.030690935199,
    "attention.scorer.query_proj.weight": -0.006110320129,
    "attention.scorer.v.weight": -0.138969399289,
    "embedding.weight": 0.575126224752,
    "init_h.weight": -0.06920176545,
    "init_h.bias": -0.129783956751,
    "init_c.weight": -0.218244676422,
    "init_c.bias": -0.319712032438,
    "gate.weight": -0.012483640451,
    "gate.bias": 0.061891397222,
    "input_embed.weight": -0.001056131904,
    "input_embed.bias": -0.18348659842,
    "input_extra.weight": -0.190194247827,
    "recurrent.weight": 0.139955945495,
    "output.weight": -0.641389637997,
    "output.bias": 3.471273304189,
}
GOLDEN_BEAM = [[26, 26, 26, 26, 26, 9, 26, 9], [28, 28, 28, 28, 28, 28, 28, 28], [26, 26, 26, 26, 26, 28, 28, 28]]


def test_default_decoder_is_unchanged():
    torch.manual_seed(0)
    dec = ShowAttendTellDecoder(30, 12, 8, 16, 10, dropout=0.0, max_positions=9).double()
    feats = torch.randn(3, 9, 12, dtype=torch.double, requires_grad=True)
    inputs = torch.randint(0, 30, (3, 5))
    out = dec(feats, inputs)
    (out.logits.pow(2).sum() + out.alphas.pow(2).sum()).backward()
    exact = dict(atol=1e-11, rtol=1e-9)
    torch.testing.assert_close(out.logits[0, :, :3].flatten(), torch.tensor(GOLDEN_LOGITS, dtype=torch.double), **exact)
    torch.testing.assert_close(out.alphas[1, 3], torch.tensor(GOLDEN_ALPHAS, dtype=torch.double), **exact)
    assert {n for n, _ in dec.named_parameters()} == set(GOLDEN_GRAD_SUMS)  # same modules, same checkpoints
    for name, p in dec.named_parameters():
        assert float(p.grad.sum()) == pytest.approx(GOLDEN_GRAD_SUMS[name], abs=1e-10), name
    assert float(feats.grad.sum()) == pytest.approx(0.1644511531, abs=1e-10)
    dec.eval()
    with torch.no_grad():
        result = beam_search(dec, dec.prepare_memory(feats.detach()), 3, 1, 2, 0, beam_size=3, max_length=8)
    assert result.tokens.tolist() == GOLDEN_BEAM and result.betas is None


def test_decoder_implements_the_step_protocol_with_typed_memory_and_state():
    dec = _decoder()
    assert isinstance(dec, StepDecoder) and isinstance(dec, ExpandsMemory)
    feats = torch.randn(2, S, C, dtype=torch.double)
    memory = dec.prepare_memory(feats)
    state = dec.init_state(memory)
    assert isinstance(memory, DecoderMemory) and isinstance(state, DecoderState)
    out = dec.step(torch.tensor([1, 1]), state, memory)
    assert isinstance(out, StepOutput) and isinstance(out.state, DecoderState)
    assert out.logits.shape == (2, V) and out.alpha.shape == (2, S) and out.beta is None


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


@pytest.mark.parametrize("query,old_name", [("previous", "input_context"), ("current", "input_feed")])
def test_state_dicts_of_the_decoder_before_the_core_load(query, old_name):
    dec = _decoder(query=query)
    state = dec.state_dict()
    state[f"{old_name}.weight"] = state.pop("input_extra.weight")
    fresh = _decoder(query=query)
    torch.nn.init.zeros_(fresh.input_extra.weight)
    fresh.load_state_dict(state)  # strict: every key accounted for
    torch.testing.assert_close(fresh.input_extra.weight, dec.input_extra.weight)
