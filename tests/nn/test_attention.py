"""The shared attention layer: invariants users rely on, and agreement with PyTorch's own."""

import math

import pytest
import torch
import torch.nn.functional as F

from captioning.nn.attention import SCORERS, Attention, MultiHeadAttention, build_attention, masked_softmax

SCORES = sorted(SCORERS)
D, S = 16, 10


def _layer(score, heads):
    return build_attention(score, D, D, attention_dim=16, num_heads=heads, max_positions=S)


def _inputs(b=3):
    keys = torch.randn(b, S, D)
    mask = torch.ones(b, S, dtype=torch.bool)
    mask[1, 6:] = False
    return torch.randn(b, D), keys, mask


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("score", SCORES)
def test_weights_sum_to_one_and_masked_positions_are_exactly_zero(score, heads):
    layer = _layer(score, heads)
    query, keys, mask = _inputs()
    context, alpha = layer(query, layer.prepare(keys, keys, mask))
    assert alpha.shape == (3, S) and context.shape == (3, D)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(3))
    assert torch.all(alpha[1, 6:] == 0.0)
    assert torch.all(alpha >= 0)


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("score", SCORES)
def test_fully_masked_row_gives_zeros_not_nan(score, heads):
    layer = _layer(score, heads)
    query, keys, mask = _inputs()
    mask[2] = False
    context, alpha = layer(query, layer.prepare(keys, keys, mask))
    assert not torch.isnan(alpha).any() and not torch.isnan(context).any()
    assert torch.all(alpha[2] == 0.0)
    if heads == 1:  # single head: zero weights -> zero context (multi-head adds out_proj bias)
        assert torch.all(context[2] == 0.0)


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("score", SCORES)
def test_gradients_reach_every_parameter(score, heads):
    layer = _layer(score, heads)
    query, keys, mask = _inputs()
    query.requires_grad_(True)
    context, alpha = layer(query, layer.prepare(keys, keys, mask))
    (context.pow(2).sum() + alpha.pow(2).sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
    if score != "location" or heads > 1:
        assert query.grad.abs().sum() > 0


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("score", SCORES)
def test_results_do_not_change_when_other_items_join_the_batch(score, heads):
    layer = _layer(score, heads).double()
    query, keys, mask = (t.double() if t.is_floating_point() else t for t in _inputs(5))
    full_ctx, full_alpha = layer(query, layer.prepare(keys, keys, mask))
    one_ctx, one_alpha = layer(query[1:2], layer.prepare(keys[1:2], keys[1:2], mask[1:2]))
    torch.testing.assert_close(one_alpha[0], full_alpha[1])
    torch.testing.assert_close(one_ctx[0], full_ctx[1])


def test_scaled_dot_matches_torch_sdpa():
    b, t, d = 4, 5, 16
    q, k, v = torch.randn(b, t, d), torch.randn(b, S, d), torch.randn(b, S, 24)
    mask = torch.rand(b, S) > 0.3
    mask[:, 0] = True
    layer = Attention(d, d, score="scaled_dot")
    context, alpha = layer(q, layer.prepare(k, v, mask))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))
    torch.testing.assert_close(context, expected, atol=1e-5, rtol=1e-5)
    expected_alpha = torch.softmax(
        (q @ k.transpose(1, 2) / math.sqrt(d)).masked_fill(~mask.unsqueeze(1), -math.inf), -1
    )
    torch.testing.assert_close(alpha, expected_alpha)


@pytest.mark.parametrize("kdim", [32, 48])
def test_multi_head_matches_torch_multihead_attention(kdim):
    b, t, d, h = 3, 4, 32, 4
    mha = torch.nn.MultiheadAttention(d, h, batch_first=True, kdim=kdim, vdim=kdim)
    ours = MultiHeadAttention(d, kdim, num_heads=h, score="scaled_dot", model_dim=d, value_dim=kdim, out_dim=d)
    ours.load_from_torch(mha)
    q, kv = torch.randn(b, t, d), torch.randn(b, S, kdim)
    mask = torch.ones(b, S, dtype=torch.bool)
    mask[0, 7:] = False
    expected, expected_w = mha(q, kv, kv, key_padding_mask=~mask, need_weights=True, average_attn_weights=True)
    context, alpha = ours(q, ours.prepare(kv, kv, mask))
    torch.testing.assert_close(context, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alpha, expected_w, atol=1e-6, rtol=1e-5)


def test_prepare_is_reused_and_layer_is_stateless():
    layer = _layer("additive", 1)
    query, keys, mask = _inputs()
    memory = layer.prepare(keys, keys, mask)
    state_before = {k: v.clone() for k, v in layer.state_dict().items()}
    first = layer(query, memory)
    second = layer(query, memory)
    torch.testing.assert_close(first, second)
    assert set(vars(layer)) == set(vars(_layer("additive", 1)))  # no cached tensors added
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state_before[k])


def test_several_queries_at_once_equal_one_by_one():
    layer = _layer("additive", 1)
    _, keys, mask = _inputs()
    queries = torch.randn(3, 6, D)
    memory = layer.prepare(keys, keys, mask)
    ctx, alpha = layer(queries, memory)
    for t in range(6):
        c1, a1 = layer(queries[:, t], memory)
        torch.testing.assert_close(ctx[:, t], c1)
        torch.testing.assert_close(alpha[:, t], a1)


def test_bad_configuration_errors_name_the_value():
    with pytest.raises(ValueError, match="bogus"):
        build_attention("bogus", D, D)
    with pytest.raises(ValueError, match="query_dim == key_dim"):
        build_attention("dot", 8, 16)
    with pytest.raises(ValueError, match="max_positions"):
        build_attention("location", D, D)
    assert build_attention("none", D, D) is None


def test_masked_softmax_edges():
    scores = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    w = masked_softmax(scores, mask)
    assert w[0, 1] == 0 and torch.all(w[1] == 0)
    torch.testing.assert_close(w[0], torch.softmax(torch.tensor([1.0, -math.inf, 3.0]), 0))
    half = masked_softmax(scores.half(), mask)
    assert not torch.isnan(half).any() and half[0, 1] == 0


# --------------------------------------------------------------------------- fast-path hooks
def _scorer_and_memory(score, heads=1, b=3, dtype=torch.double):
    """A layer's scorer with its prepared keys, flattened as the fast path sees them: (N, S, A)."""
    layer = _layer(score, heads).to(dtype)
    keys = torch.randn(b, S, D, dtype=dtype)
    memory = layer.prepare(keys, keys)
    prepared = memory.keys.reshape(b * heads, S, memory.keys.shape[-1])
    q_dim = layer.fused_query_map()[0].shape[0] // heads if layer.fused_query_map() is not None else D
    return layer.scorer, prepared, q_dim


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("score", SCORES)
def test_no_graph_scores_equal_the_plain_scores(score, heads):
    scorer, prepared, q_dim = _scorer_and_memory(score, heads)
    qp = torch.randn(prepared.shape[0], 3, q_dim, dtype=torch.double)  # K = 3 queries per item
    scratch = scorer.new_scratch(prepared.shape[0], 3, prepared) if scorer.offers("scores_into") else None
    if scratch is not None:  # chunks of 2 items: the last one partial
        scratch = scratch[:2]
    with torch.no_grad():
        fast = scorer.hook("scores_into")(qp, prepared, scratch)
    torch.testing.assert_close(fast, scorer.scores(qp, prepared))


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("score", SCORES)
def test_score_backward_equals_autograd_over_several_steps(score, heads):
    """The scorer's own backward (hand-written for every built-in score) = autograd of ``scores``:
    query gradient each step, key and parameter gradients summed over the steps."""
    scorer, prepared, q_dim = _scorer_and_memory(score, heads)
    n, steps = prepared.shape[0], 4
    queries = torch.randn(steps, n, 1, q_dim, dtype=torch.double)
    queries[0, 0] *= 1e-9  # a query below the content score's normalisation eps
    d_scores = torch.randn(steps, n, 1, S, dtype=torch.double)
    backward = scorer.score_backward(prepared)
    assert scorer.offers("score_backward"), "every built-in score has its own backward"
    d_q = [backward.step(d_scores[t], queries[t]) for t in reversed(range(steps))][::-1]
    d_prepared, d_params = backward.finish()

    keys = prepared.detach().clone().requires_grad_(True)
    q = queries.clone().requires_grad_(True)
    params = scorer.score_parameters()
    total = sum((scorer.scores(q[t], keys) * d_scores[t]).sum() for t in range(steps))
    expected = torch.autograd.grad(total, (q, keys, *params), allow_unused=True)
    torch.testing.assert_close(torch.stack(d_q), expected[0])
    torch.testing.assert_close(d_prepared, torch.zeros_like(keys) if expected[1] is None else expected[1])
    assert len(d_params) == len(params)
    for got, want in zip(d_params, expected[2:]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("score", SCORES)
def test_paired_score_is_the_score_of_an_extra_memory_position(score):
    """``scores_paired(q, k, S)`` = the score q would give k as position S of the memory."""
    layer = build_attention(score, D, D, attention_dim=16, max_positions=S + 1).double()
    keys, extra = torch.randn(2, S, D, dtype=torch.double), torch.randn(2, 3, D, dtype=torch.double)
    qp = layer.scorer.project_query(torch.randn(2, 3, D, dtype=torch.double))  # (B, K, Q)
    paired = layer.scorer.hook("scores_paired")(qp, layer.scorer.prepare_keys(extra), S)
    for k in range(3):
        joint = layer.scorer.prepare_keys(torch.cat([keys, extra[:, k : k + 1]], 1))  # (B, S + 1, A)
        torch.testing.assert_close(paired[:, k], layer.scorer.scores(qp[:, k : k + 1], joint)[:, 0, S])


@pytest.mark.parametrize("score", SCORES)
def test_multi_head_fused_query_map_is_the_two_stage_projection(score):
    layer = MultiHeadAttention(D, D, num_heads=4, score=score, attention_dim=6, max_positions=S).double()
    query = torch.randn(5, 2, D, dtype=torch.double)
    w, b = layer.fused_query_map()
    staged = layer._project(query)  # (B, H, K, Q): q_proj, split, then the scorer's own map
    fused = torch.nn.functional.linear(query, w, b).view(5, 2, 4, -1).transpose(1, 2)
    torch.testing.assert_close(fused, staged)


def test_a_hook_counts_only_next_to_its_maths():
    from captioning.nn.scores import AdditiveScorer, Scorer

    class NewMaths(AdditiveScorer):  # changes scores() only: the additive fast hooks no longer apply
        def scores(self, qp, prepared):
            return super().scores(qp, prepared) ** 2

    plain, changed = AdditiveScorer(4, 4, 4), NewMaths(4, 4, 4)
    assert plain.offers("scores_into") and plain.offers("score_backward")
    assert not changed.offers("scores_into") and not changed.offers("score_backward")
    assert changed.hook("scores_into").__func__ is Scorer.scores_into
    keys = changed.prepare_keys(torch.randn(2, S, 4))
    q = torch.randn(2, 1, 4)
    with torch.no_grad():
        torch.testing.assert_close(changed.hook("scores_into")(q, keys), changed.scores(q, keys))
