"""BiLSTM encoder + attention LSTM decoder: shared attention/search, masking, query styles, scores."""

import inspect

import pytest
import torch

import captioning.attention as attention_module
import captioning.models as models_module
import captioning.search as search_module
import captioning.text_model as text_model_module
from captioning.attention import SCORERS
from captioning.encoders import SmallCNN
from captioning.models import ImageCaptioner
from captioning.search import beam_search, greedy_search
from captioning.seq2seq import AttentionLSTMDecoder, BiLSTMEncoder
from captioning.text_model import Seq2SeqModel
from datamodules.text import SyntheticTextDataModule, collate



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
    captioner = ImageCaptioner(SmallCNN(channels=32, grid_size=4), vocab={"itos": ["a", "b"]}, attention="additive",
                               embed_dim=16, decoder_dim=32, attention_dim=16)
    seq2seq = tiny_model(attention="additive")
    assert type(captioner.decoder.attention) is type(seq2seq.decoder.attention) is attention_module.Attention
    assert type(captioner.decoder.attention.scorer) is type(seq2seq.decoder.attention.scorer)
    assert inspect.getsourcefile(type(seq2seq.decoder.attention)) == inspect.getsourcefile(attention_module)
    import captioning.decoders as decoders_module
    import captioning.seq2seq as seq2seq_module

    # Both decoders build their attention with the one factory.
    assert seq2seq_module.build_attention is decoders_module.build_attention is attention_module.build_attention
    for name in ("beam_search", "greedy_search"):  # the very functions, not copies
        assert getattr(text_model_module, name) is getattr(models_module, name) is getattr(search_module, name)
    # The captioner's own search drives the text decoder unchanged: model.generate == search on its memory.
    b = batch_of()
    memory = seq2seq.memory(b["source"], b["source_lengths"])
    direct = beam_search(seq2seq.decoder, memory, 4, BOS, EOS, PAD, beam_size=3, max_length=12)
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
    torch.testing.assert_close(alphas.sum(-1), torch.ones_like(alphas.sum(-1)))
    # Five more padding columns: same loss, same attention on the real positions, 0 on the new ones.
    extra = dict(b, source=torch.cat([b["source"], torch.zeros(4, 5, dtype=torch.long)], 1))
    loss_pad, alphas_pad = model.loss(extra)
    torch.testing.assert_close(loss_pad, model.loss(b)[0])
    torch.testing.assert_close(alphas_pad[..., :b["source"].shape[1]], alphas)
    assert torch.all(alphas_pad[..., b["source"].shape[1]:] == 0)
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
