"""BiLSTM encoder + attention LSTM decoder: shared attention/search, masking, query styles, scores."""

import inspect

import pytest
import torch

import captioning.models.image_captioner as models_module
import captioning.models.seq2seq as text_model_module
import captioning.nn.attention as attention_module
import captioning.nn.search as search_module
from captioning.data.batches import collate_text as collate
from captioning.data.text_tasks import SyntheticTextDataModule
from captioning.models.image_captioner import ImageCaptioner
from captioning.models.seq2seq import Seq2SeqModel
from captioning.nn.attention import SCORERS
from captioning.nn.encoders import SmallCNN
from captioning.nn.search import beam_search, greedy_search
from captioning.nn.text_decoder import AttentionLSTMDecoder
from captioning.nn.text_encoder import BiLSTMEncoder

BOS, EOS, PAD = 1, 2, 0


def small_vocab_data():
    return SyntheticTextDataModule(task="dates", max_items=2, train_size=8).vocab_data


def tiny_model(**kw):
    args = dict(embed_dim=16, encoder_dim=16, decoder_dim=32, attention_dim=16, dropout=0.0, max_source_length=64)
    args.update(kw)
    return Seq2SeqModel(vocab=small_vocab_data(), **args)


def batch_of(n=4, max_items=3, seed=0):
    dm = SyntheticTextDataModule(task="dates", min_items=1, max_items=max_items, train_size=n, seed=seed)
    return collate(dm.examples("train", range(n)))


def test_image_and_text_models_share_one_attention_layer_and_one_search():
    captioner = ImageCaptioner(
        SmallCNN(channels=32, grid_size=4),
        vocab={"itos": ["a", "b"]},
        attention="additive",
        embed_dim=16,
        decoder_dim=32,
        attention_dim=16,
    )
    seq2seq = tiny_model(attention="additive")
    assert type(captioner.decoder.attention) is type(seq2seq.decoder.attention) is attention_module.Attention
    assert type(captioner.decoder.attention.scorer) is type(seq2seq.decoder.attention.scorer)
    assert inspect.getsourcefile(type(seq2seq.decoder.attention)) == inspect.getsourcefile(attention_module)
    import captioning.nn.decoder_core as core_module

    # Both decoders are the one attention-LSTM core, which builds its attention with the one factory.
    assert isinstance(captioner.decoder, core_module.AttentionDecoderCore)
    assert isinstance(seq2seq.decoder, core_module.AttentionDecoderCore)
    assert core_module.build_attention is attention_module.build_attention
    for name in ("step", "_advance", "_attend", "_fused", "teacher_forced", "prepare_memory", "init_state"):
        assert getattr(type(captioner.decoder), name) is getattr(type(seq2seq.decoder), name), name
    # Both models decode through the one base-class search, i.e. the very search functions.
    from captioning.models.base import AttentionModel

    assert text_model_module.Seq2SeqModel.search is models_module.ImageCaptioner.search is AttentionModel.search
    for name in ("beam_search", "greedy_search"):
        assert getattr(__import__("captioning.models.base", fromlist=[name]), name) is getattr(search_module, name)
    # The captioner's own search drives the text decoder unchanged: model.generate == search on its memory.
    b = batch_of()
    memory = seq2seq.memory(b["source"], b["source_lengths"])
    direct = beam_search(
        seq2seq.decoder, memory, 4, BOS, EOS, PAD, beam_size=3, max_length=12, banned_ids=seq2seq.banned_ids()
    )
    via_model = seq2seq.generate(b["source"], b["source_lengths"], beam_size=3, max_length=12)
    assert torch.equal(direct.tokens, via_model.tokens)


def test_encoder_states_do_not_depend_on_padding():
    enc = BiLSTMEncoder(30, 8, 8).eval()
    src = torch.tensor([[5, 6, 7, 2], [8, 2, 0, 0]])
    lengths = torch.tensor([4, 2])
    out = enc(src, lengths)
    padded = enc(torch.cat([src, torch.zeros(2, 3, dtype=torch.long)], 1), lengths)
    torch.testing.assert_close(padded.states[:, :4], out.states)
    assert torch.all(padded.states[:, 4:] == 0) and torch.all(out.states[1, 2:] == 0)
    torch.testing.assert_close(padded.summary, out.summary)
    alone = enc(src[1:, :2], lengths[1:])  # the short item on its own, no padding at all
    torch.testing.assert_close(alone.states[0], out.states[1, :2])
    assert out.mask.tolist() == [[True] * 4, [True, True, False, False]]


@pytest.mark.parametrize("query", ["bahdanau", "luong"])
def test_padded_source_positions_get_exactly_zero_attention_and_change_nothing(query):
    model = tiny_model(query=query).eval()
    b = batch_of()
    _, alphas = model.loss(b)
    s = b["source_lengths"]
    pad = torch.arange(b["source"].shape[1])[None, :] >= s[:, None]  # (B, S)
    assert bool((s < b["source"].shape[1]).any())  # the batch really has padding
    assert torch.all(alphas.masked_select(pad[:, None, :].expand_as(alphas)) == 0)
    real = b["target"][:, 1:] != 0  # (B, T) real target steps; padding steps are skipped (zero attention)
    torch.testing.assert_close(alphas.sum(-1), real.to(alphas.dtype))
    # Five more padding columns: same loss, same attention on the real positions, 0 on the new ones.
    extra = dict(b, source=torch.cat([b["source"], torch.zeros(4, 5, dtype=torch.long)], 1))
    loss_pad, alphas_pad = model.loss(extra)
    torch.testing.assert_close(loss_pad, model.loss(b)[0])
    torch.testing.assert_close(alphas_pad[..., : b["source"].shape[1]], alphas)
    assert torch.all(alphas_pad[..., b["source"].shape[1] :] == 0)
    # Decoding too: padding never changes the output.
    out, out_pad = (model.generate(x["source"], x["source_lengths"], beam_size=2, max_length=10) for x in (b, extra))
    assert torch.equal(out.tokens, out_pad.tokens)


@pytest.mark.parametrize("query", ["bahdanau", "luong"])
def test_query_style_decides_which_state_asks(query):
    """Bahdanau attends with the previous state: step t's attention cannot see input word t.
    Luong attends with the current state: it can."""
    torch.manual_seed(1)
    enc_dim, dec = 12, AttentionLSTMDecoder(20, 12, 8, 16, 8, attention="additive", query=query, dropout=0.0)
    states = torch.randn(1, 6, enc_dim)
    inputs = torch.tensor([[1, 5, 7, 9]])
    changed = inputs.clone()
    changed[0, 2] = 11
    a = dec(states, inputs).alphas
    b = dec(states, changed).alphas
    torch.testing.assert_close(a[:, :2], b[:, :2])  # before the change: identical either way
    same_at_t = torch.allclose(a[:, 2], b[:, 2])
    assert same_at_t == (query == "bahdanau")
    assert not torch.allclose(a[:, 3], b[:, 3])  # after it: both styles see it


@pytest.mark.parametrize("query", ["bahdanau", "luong"])
@pytest.mark.parametrize("score", sorted(SCORERS) + ["none"])
def test_every_score_function_builds_and_learns(score, query):
    model = tiny_model(attention=score, query=query)
    assert (model.decoder.attention is None) == (score == "none")
    b = batch_of(8, max_items=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(8):
        loss, alphas = model.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first  # it trains (overfits one batch)
    assert torch.isfinite(alphas).all()
    res = model.generate(b["source"], b["source_lengths"], beam_size=2, max_length=8)
    assert res.alphas.shape[-1] == b["source"].shape[1]


def test_multi_head_and_dot_with_different_sizes_build():
    mh = tiny_model(attention="scaled_dot", num_heads=4)
    assert isinstance(mh.decoder.attention, attention_module.MultiHeadAttention)
    dot = tiny_model(attention="dot", encoder_dim=16, decoder_dim=48)  # keys 32 wide, queries 48
    b = batch_of()
    for model in (mh, dot):
        loss, alphas = model.loss(b)
        assert torch.isfinite(loss) and alphas.shape[-1] == b["source"].shape[1]


def test_beam_of_one_is_greedy_and_none_attention_is_uniform_over_real_tokens():
    model = tiny_model(attention="none").eval()
    b = batch_of()
    memory = model.memory(b["source"], b["source_lengths"])
    g = greedy_search(model.decoder, memory, 4, BOS, EOS, PAD, max_length=9)
    k1 = beam_search(model.decoder, memory, 4, BOS, EOS, PAD, beam_size=1, max_length=9)
    assert torch.equal(g.tokens, k1.tokens)
    s = b["source_lengths"].float()
    expected = (torch.arange(b["source"].shape[1])[None] < s[:, None]).float() / s[:, None]
    torch.testing.assert_close(g.alphas[:, 0], expected)


def test_bad_query_and_bad_lengths_are_clear_errors():
    with pytest.raises(ValueError, match="query"):
        AttentionLSTMDecoder(10, 8, query="sideways")
    enc = BiLSTMEncoder(10, 4, 4)
    with pytest.raises(ValueError, match="lengths"):
        enc(torch.tensor([[3, 2]]), torch.tensor([0]))


@pytest.mark.parametrize("query", ["bahdanau", "luong"])
@pytest.mark.parametrize(
    ("attention", "heads"),
    [("additive", 1), ("dot", 1), ("general", 1), ("content", 1), ("location", 1), ("scaled_dot", 2), ("additive", 2)],
)
def test_fused_teacher_forcing_matches_the_plain_loop_in_outputs_and_every_gradient(query, attention, heads):
    torch.manual_seed(3)
    fused = tiny_model(query=query, attention=attention, num_heads=heads).double()
    plain = tiny_model(query=query, attention=attention, num_heads=heads, fused=False).double()
    plain.load_state_dict(fused.state_dict())
    assert fused.decoder.uses_fused_recurrence and not plain.decoder.uses_fused_recurrence
    b = batch_of(5, max_items=3)
    results = []
    real = b["target"][:, 1:] != 0  # the fused path skips each row's padding steps, the plain loop runs them
    assert bool((~real).any())  # the batch really has padding steps
    for model in (fused, plain):
        model.zero_grad()
        loss, alphas = model.loss(b)
        (loss + alphas[real].pow(2).sum()).backward()  # a gradient through the attention too
        results.append((loss, alphas, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l1, a1, g1), (l2, a2, g2) = results
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(a1[real], a2[real])
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], msg=name)


def test_loss_ignores_padding_and_matches_cross_entropy_over_all_positions():
    model = tiny_model(label_smoothing=0.1).eval()
    b = batch_of(6)
    loss, _ = model.loss(b)
    enc = model.encoder(b["source"], b["source_lengths"])
    logits = model.decoder(enc.states, b["target"][:, :-1], enc.mask, enc.summary).logits
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), b["target"][:, 1:].reshape(-1), ignore_index=PAD, label_smoothing=0.1
    )
    torch.testing.assert_close(loss, expected)


def test_a_translation_does_not_depend_on_its_batch_and_long_sources_are_cut():
    model = tiny_model(max_source_length=8, max_length_ratio=1.0).eval()
    texts = ["1 jan 2000", "3 feb 1999, 4 mar 2000, 5 apr 2001, 6 may 2002"]
    alone = [model.translate([t], beam_size=2)[0] for t in texts]
    together = model.translate(texts, beam_size=2)
    for a, b in zip(alone, together):  # same words; attention equal up to float rounding of other batch sizes
        assert a.text == b.text and a.target_tokens == b.target_tokens
        torch.testing.assert_close(a.alpha, b.alpha)
    # Own cap: ratio 1.0 * (3 tokens + EOS) + 10 = 14 tokens for the short one, whatever its batch.
    assert len(together[0].target_tokens) <= 14
    long = model.source_report(texts[1])
    assert long.cut and long.kept == 7 and len(together[1].source_tokens) == 8  # 7 tokens + <eos>
    assert together[1].source_tokens[:7] == long.tokens[:7]
