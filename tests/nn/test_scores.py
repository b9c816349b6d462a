"""A score function's maths is the one its class defines, on every path.

* A subclass of AdditiveScorer with different maths (softsign instead of tanh), written as its
  maths hooks only (``scores``, ``scores_into``, ``score_backward``): one training step (fused
  recurrence) and beam search (no-graph scores) both follow it, checked against a plain
  autograd loop written here from the subclass's ``score``.
* The same maths in ``scores`` alone: every path falls back to autograd through it.
* docs/attention.md's newcomer walk, done: a new score defined here, registered, trained, decoded.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captioning.nn.image_decoder import ShowAttendTellDecoder
from captioning.nn.scores import SCORERS, AdditiveScorer, Scorer
from captioning.nn.search import StepOutput, beam_search

V, C, S = 25, 12, 9
PAD, BOS, EOS = 0, 1, 2


class SoftsignMaths(AdditiveScorer):
    """``v^T softsign(W1 q + W2 k)``: AdditiveScorer's parameters, different maths in ``scores``."""

    def scores(self, qp, prepared):
        return self.v(F.softsign(qp.unsqueeze(-2) + prepared.unsqueeze(-3))).squeeze(-1)


class _SoftsignBackward:
    def __init__(self, prepared, v, calls):
        self.keys, self.v, self.calls = prepared, v, calls
        self.d_keys, self.d_v = torch.zeros_like(prepared), torch.zeros_like(v)

    def step(self, d_scores, qp):  # (N, 1, S), (N, 1, A)
        self.calls["backward_step"] += 1
        pre = qp + self.keys  # (N, S, A)
        self.d_v += torch.bmm(d_scores, F.softsign(pre)).sum((0, 1))
        d_pre = d_scores.transpose(1, 2) * self.v / (1 + pre.abs()) ** 2
        self.d_keys += d_pre
        return d_pre.sum(1, keepdim=True)

    def finish(self):
        return self.d_keys, (self.d_v.view(1, -1),)


class SoftsignScorer(SoftsignMaths):
    """The same maths with its own fast hooks, next to ``scores`` as they must be to count."""

    calls: Counter = Counter()

    def scores(self, qp, prepared):
        return super().scores(qp, prepared)

    @torch.no_grad()
    def scores_into(self, qp, prepared, scratch=None):
        self.calls["scores_into"] += 1
        return F.softsign(qp.unsqueeze(2) + prepared.unsqueeze(1)) @ self.v.weight.view(-1)

    def score_backward(self, prepared):
        self.calls["score_backward"] += 1
        return _SoftsignBackward(prepared, self.v.weight.detach().view(-1), self.calls)


def _decoder(score, **kw):
    torch.manual_seed(0)
    return ShowAttendTellDecoder(V, C, 8, 16, 10, attention=score, dropout=0.0, max_positions=S, **kw).double()


class ReferenceSAT:
    """Show-Attend-Tell written plainly from the decoder's weights and ``scorer.score`` (autograd
    only: no fused recurrence, no fast hooks, not the library's attention layer)."""

    def __init__(self, dec):
        self.dec = dec

    def prepare_memory(self, feats):
        return {"feats": feats, "keys": self.dec.attention.scorer.prepare_keys(feats)}

    def init_state(self, memory):
        mean = memory["feats"].mean(1)
        return {"h": torch.tanh(self.dec.init_h(mean)), "c": torch.tanh(self.dec.init_c(mean))}

    def step(self, tokens, state, memory):
        d, h, c = self.dec, state["h"], state["c"]
        alpha = torch.softmax(d.attention.scorer.score(h.unsqueeze(1), memory["keys"]).squeeze(1), -1)  # (N, S)
        context = torch.sigmoid(d.gate(h)) * (alpha.unsqueeze(-1) * memory["feats"]).sum(1)
        gates = d.input_embed(d.embedding(tokens)) + d.input_extra(context) + d.recurrent(h)
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return StepOutput(d.output(h), alpha, {"h": h, "c": c})

    def forward(self, feats, inputs):
        memory = self.prepare_memory(feats)
        state, logits, alphas = self.init_state(memory), [], []
        for t in range(inputs.shape[1]):
            out = self.step(inputs[:, t], state, memory)
            state = out.state
            logits.append(out.logits)
            alphas.append(out.alpha)
        return torch.stack(logits, 1), torch.stack(alphas, 1)


def _train_step(loss_fn, model):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    opt.step()
    return loss.item()


def _follows_its_maths(monkeypatch, cls):
    monkeypatch.setitem(SCORERS, "softsign", cls)
    dec = _decoder("softsign")
    assert type(dec.attention.scorer) is cls and dec.uses_fused_recurrence
    ref = copy.deepcopy(dec)
    feats, captions = torch.randn(4, S, C, dtype=torch.double), torch.randint(3, V, (4, 7))

    def loss(logits, alphas):
        ce = F.cross_entropy(logits.reshape(-1, V), captions[:, 1:].reshape(-1))
        return ce + ((1 - alphas.sum(1)) ** 2).mean()

    # One training step: the fused recurrence vs the plain reference, then the updated weights.
    got = _train_step(lambda: loss(*dec(feats, captions[:, :-1])[:2]), dec)
    want = _train_step(lambda: loss(*ReferenceSAT(ref).forward(feats, captions[:, :-1])), ref)
    assert got == pytest.approx(want, rel=1e-12)
    for (name, p), q in zip(dec.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name} after one step: {m}")
    # Beam search (K queries per image against the shared grid) vs the reference step.
    dec.eval()
    with torch.no_grad():
        fast = beam_search(dec, dec.prepare_memory(feats), 4, BOS, EOS, PAD, beam_size=3, max_length=10)
        reference = ReferenceSAT(dec)
        slow = beam_search(reference, reference.prepare_memory(feats), 4, BOS, EOS, PAD, beam_size=3, max_length=10)
    assert torch.equal(fast.tokens, slow.tokens)
    torch.testing.assert_close(fast.scores, slow.scores)
    torch.testing.assert_close(fast.alphas, slow.alphas)
    # The maths really differs from the additive one (same weights, other scores).
    scorer = dec.attention.scorer
    keys, qp = scorer.prepare_keys(feats), torch.randn(4, 1, 10, dtype=torch.double)
    assert not torch.allclose(scorer.scores(qp, keys), AdditiveScorer.scores(scorer, qp, keys), atol=1e-3)


def test_training_and_beam_search_follow_a_subclass_that_overrides_its_maths_hooks(monkeypatch):
    SoftsignScorer.calls.clear()
    _follows_its_maths(monkeypatch, SoftsignScorer)
    # Its own hooks ran: the backward on every step of training, the no-graph scores in search.
    assert SoftsignScorer.calls["score_backward"] == 1 and SoftsignScorer.calls["backward_step"] == 6
    assert SoftsignScorer.calls["scores_into"] >= 10


def test_a_subclass_that_changes_scores_alone_falls_back_on_every_path(monkeypatch):
    """AdditiveScorer's fast hooks do not apply to other maths: autograd through ``scores``."""
    assert not SoftsignMaths(4, 4, 4).offers("scores_into")
    _follows_its_maths(monkeypatch, SoftsignMaths)


# --------------------------------------------------------------------------- the newcomer's walk
class DistanceScorer(Scorer):
    """``-|W q - k|^2 / sqrt(d)``: attend to the features closest to the (projected) query."""

    def __init__(self, query_dim, key_dim, attention_dim=None, **_):
        super().__init__()
        self.query_proj = nn.Linear(query_dim, key_dim, bias=False)
        self.scale = key_dim**-0.5

    def query_map(self):  # the linear first stage: the fused recurrence stacks it with the LSTM's
        return self.query_proj.weight, None

    def score_parameters(self):  # what scores() reads (none besides its inputs)
        return ()

    def scores(self, qp, prepared):  # (..., K, Q), (..., S, A) -> (..., K, S)
        return -torch.cdist(qp, prepared).pow(2) * self.scale


@pytest.mark.parametrize("heads", [1, 2])
def test_a_new_score_defined_and_registered_trains_and_decodes(monkeypatch, heads):
    monkeypatch.setitem(SCORERS, "distance", DistanceScorer)  # the registration: one dict entry
    dec = _decoder("distance", num_heads=heads)
    assert isinstance(dec.attention.scorer, DistanceScorer) and dec.uses_fused_recurrence
    feats, captions = torch.randn(4, S, C, dtype=torch.double), torch.randint(3, V, (4, 6))
    # Training: the fused recurrence (autograd backward through scores()) equals the plain loop.
    from support.recurrence import assert_fused_equals_plain, training_losses

    assert_fused_equals_plain(dec, feats, captions[:, :-1])
    # It learns: a few steps on one batch bring the loss down.
    losses = training_losses(dec, feats, captions, steps=20, lr=2e-2)
    assert losses[-1] < 0.5 * losses[0]
    # Decoding: beam search returns captions with attention maps that sum to 1.
    dec.eval()
    with torch.no_grad():
        result = beam_search(dec, dec.prepare_memory(feats), 4, BOS, EOS, PAD, beam_size=3, max_length=8)
    torch.testing.assert_close(result.alphas.sum(-1), torch.ones(result.alphas.shape[:2]))
