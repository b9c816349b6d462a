"""The text decoder's sentinel (``sentinel=True``): beta per target token = how much it relied on
the decoder's language state instead of the source. Both query styles, several scores, one and
two heads; the fused path, step-by-step decoding, search, checkpoints, translate JSON, heatmaps."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import captioning.viz as viz
from captioning.commands.translate import main as translate_main
from captioning.data.batches import collate_text as collate
from captioning.data.text_tasks import SyntheticTextDataModule
from captioning.io.model_loading import load_model
from captioning.io.results import translation_record
from captioning.models.seq2seq import Seq2SeqModel
from captioning.nn.search import beam_search, greedy_search
from captioning.nn.text_decoder import AttentionLSTMDecoder
from captioning.viz import _SENTINEL, seq2seq_heatmap

from support.recurrence import assert_fused_equals_plain

V, C, S, T = 20, 12, 7, 5
PAD, BOS, EOS = 0, 1, 2
QUERIES = ["bahdanau", "luong"]
# (score, heads): dot with C != D goes through the key bridge; location scores the sentinel by
# its index (the decoder pads to a fixed width); multi-head with two scores.
ATTENTIONS = [("additive", 1), ("dot", 1), ("general", 1), ("location", 1), ("scaled_dot", 2), ("additive", 2)]


def _decoder(query, score="additive", heads=1, max_positions=S + 2):
    torch.manual_seed(0)
    return AttentionLSTMDecoder(
        V,
        C,
        8,
        16,
        8,
        attention=score,
        query=query,
        num_heads=heads,
        dropout=0.0,
        max_positions=max_positions,
        sentinel=True,
    ).double()


def _inputs(b=4):
    g = torch.Generator().manual_seed(1)
    states = torch.randn(b, S, C, generator=g, dtype=torch.double)
    mask = torch.ones(b, S, dtype=torch.bool)
    mask[1, 4:] = False  # padded sources
    mask[2, 1:] = False  # a one-token source
    return states * mask.unsqueeze(-1), torch.randint(3, V, (b, T), generator=g), mask


@pytest.mark.parametrize(("score", "heads"), ATTENTIONS)
@pytest.mark.parametrize("query", QUERIES)
def test_shapes_betas_and_source_weights(query, score, heads):
    """beta in [0, 1]; alphas are the source weights renormalised over the real positions (rows
    sum to 1, padding gets exactly 0)."""
    dec = _decoder(query, score, heads).eval()
    states, inputs, mask = _inputs()
    out = dec(states, inputs, mask)
    assert out.logits.shape == (4, T, V) and out.alphas.shape == (4, T, S) and out.betas.shape == (4, T)
    assert torch.all((out.betas >= 0) & (out.betas <= 1)) and bool((out.betas > 0).all())
    torch.testing.assert_close(out.alphas.sum(-1), torch.ones(4, T, dtype=torch.double))
    assert torch.all(out.alphas.masked_select(~mask[:, None, :].expand_as(out.alphas)) == 0)
    assert torch.all(out.alphas[2, :, 0] == 1)  # one real token: all the source weight is on it


@pytest.mark.parametrize(("score", "heads"), ATTENTIONS)
@pytest.mark.parametrize("query", QUERIES)
def test_fused_teacher_forcing_equals_the_plain_loop_in_outputs_and_every_gradient(query, score, heads):
    dec = _decoder(query, score, heads)
    states, inputs, mask = _inputs()
    assert_fused_equals_plain(dec, states, inputs, mask)  # logits, alphas, betas; every parameter; the states
    sentinel_modules = ("sentinel_proj",) + (("init_sentinel",) if query == "bahdanau" else ())
    for name in sentinel_modules:
        assert getattr(dec, name).weight.grad.abs().sum() > 0, name  # the sentinel trains on the fused path


@pytest.mark.parametrize(("score", "heads"), ATTENTIONS)
@pytest.mark.parametrize("query", QUERIES)
def test_teacher_forcing_equals_step_by_step_decoding(query, score, heads):
    dec = _decoder(query, score, heads).eval()
    states, inputs, mask = _inputs()
    out = dec(states, inputs, mask)  # the fused recurrence
    memory = dec.prepare_memory(states, mask)
    state = dec.init_state(memory)
    for t in range(T):
        step = dec.step(inputs[:, t], state, memory)
        state = step.state
        torch.testing.assert_close(step.logits, out.logits[:, t])
        torch.testing.assert_close(step.alpha, out.alphas[:, t])
        torch.testing.assert_close(step.beta, out.betas[:, t])


def small_vocab_data():
    return SyntheticTextDataModule(task="dates", max_items=2, train_size=8).vocab_data


def tiny_model(**kw):
    args = dict(
        embed_dim=16, encoder_dim=16, decoder_dim=32, attention_dim=16, dropout=0.0, max_source_length=24, sentinel=True
    )
    args.update(kw)
    return Seq2SeqModel(vocab=small_vocab_data(), **args)


def batch_of(n=4, max_items=3, seed=0):
    dm = SyntheticTextDataModule(task="dates", min_items=1, max_items=max_items, train_size=n, seed=seed)
    return collate(dm.examples("train", range(n)))


@pytest.mark.parametrize(("score", "heads"), [("additive", 1), ("location", 1), ("scaled_dot", 2)])
@pytest.mark.parametrize("query", QUERIES)
def test_beam_of_one_is_greedy_and_search_results_carry_betas(query, score, heads):
    model = tiny_model(query=query, attention=score, num_heads=heads).eval()
    b = batch_of()
    memory = model.memory(b["source"], b["source_lengths"])
    g = greedy_search(model.decoder, memory, 4, BOS, EOS, PAD, max_length=9)
    k1 = beam_search(model.decoder, memory, 4, BOS, EOS, PAD, beam_size=1, max_length=9)
    assert torch.equal(g.tokens, k1.tokens)
    torch.testing.assert_close(g.scores, k1.scores)
    torch.testing.assert_close(g.alphas, k1.alphas)
    torch.testing.assert_close(g.betas, k1.betas)
    wide = model.generate(b["source"], b["source_lengths"], beam_size=3)  # through the per-sentence cap
    for result in (g, k1, wide):
        assert result.betas.shape == result.tokens.shape
        assert torch.all((result.betas >= 0) & (result.betas <= 1))
        assert result.alphas.shape[-1] == b["source"].shape[1]


@pytest.mark.parametrize("score", ["additive", "location"])
def test_padding_and_batch_mates_change_nothing(score):
    """Extra padding columns change neither the loss nor the attention; a sentence's translation
    and its sentinel weights do not depend on its batch (location: the fixed-width memory)."""
    model = tiny_model(attention=score, query="luong").eval()
    b = batch_of()
    loss, alphas = model.loss(b)
    extra = dict(b, source=torch.cat([b["source"], torch.zeros(4, 3, dtype=torch.long)], 1))
    loss_pad, alphas_pad = model.loss(extra)
    torch.testing.assert_close(loss_pad, loss)
    torch.testing.assert_close(alphas_pad[..., : b["source"].shape[1]], alphas)
    assert torch.all(alphas_pad[..., b["source"].shape[1] :] == 0)
    texts = ["1 jan 2000", "3 feb 1999, 4 mar 2000, 5 apr 2001"]
    alone = [model.translate([t], beam_size=2)[0] for t in texts]
    together = model.translate(texts, beam_size=2)
    for a, t in zip(alone, together):
        assert a.text == t.text and a.target_tokens == t.target_tokens
        torch.testing.assert_close(a.alpha, t.alpha)
        torch.testing.assert_close(torch.tensor(a.sentinel), torch.tensor(t.sentinel))


def _write_checkpoint(model, path, drop=()):
    hparams = {k: v for k, v in dict(model.hparams).items() if k not in drop}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, path)
    return path


def test_a_checkpoint_without_the_key_loads_with_the_sentinel_off(tmp_path):
    old = tiny_model(sentinel=False).eval()
    assert "sentinel" in old.hparams and not old.decoder.sentinel
    assert old.decoder.input_embed.weight.shape[0] == 4 * 32
    assert not any("sentinel" in k for k in old.state_dict())
    loaded = load_model(
        _write_checkpoint(old, tmp_path / "old.ckpt", drop=("sentinel",)),
        default_class="captioning.models.seq2seq.Seq2SeqModel",
    )
    assert not loaded.decoder.sentinel and not loaded.hparams.get("sentinel", False)
    texts = ["1 jan 2000", "2 feb 1999"]
    for a, b in zip(old.translate(texts), loaded.translate(texts)):
        assert a.text == b.text and torch.equal(a.alpha, b.alpha) and a.sentinel is b.sentinel is None
    # And a sentinel model round-trips with its sentinel.
    new = tiny_model(query="bahdanau").eval()
    back = load_model(
        _write_checkpoint(new, tmp_path / "new.ckpt"), default_class="captioning.models.seq2seq.Seq2SeqModel"
    )
    assert back.decoder.sentinel and back.hparams.sentinel
    for a, b in zip(new.translate(texts), back.translate(texts)):
        assert a.text == b.text and a.sentinel == b.sentinel


def _sentinel_pixels(figure) -> np.ndarray:
    px = np.asarray(figure)
    return np.all(px == np.array(_SENTINEL, dtype=px.dtype), axis=-1)


def test_heatmap_draws_a_language_column_filled_by_beta():
    src, tgt = ["a", "b", "c", "<eos>"], ["x", "y", "z", "<eos>"]
    alpha = torch.softmax(torch.randn(4, 4), -1)
    plain = seq2seq_heatmap(src, tgt, alpha)
    betas = [1.0, 0.0, 0.5, 0.25]
    fig = seq2seq_heatmap(src, tgt, alpha, sentinel=betas)
    assert fig.size[0] > plain.size[0] and not _sentinel_pixels(plain).any()
    blue = _sentinel_pixels(fig)
    widths = {}  # per drawn row band: filled width
    for y in np.nonzero(blue.any(1))[0]:
        widths.setdefault(int(blue[y].sum()), []).append(int(y))
    full, half, quarter = sorted(widths, reverse=True)  # beta 0 draws nothing
    assert abs(half / full - 0.5) < 0.05 and abs(quarter / full - 0.25) < 0.05
    assert max(widths[full]) < min(widths[half]) < min(widths[quarter])  # rows in target order: 1.0, (0), 0.5, 0.25
    with pytest.raises(ValueError, match="sentinel"):
        seq2seq_heatmap(src, tgt, alpha, sentinel=[0.5, 0.5])


def test_translate_json_heatmap_and_figures_carry_the_sentinel(tmp_path, monkeypatch, capsys):
    model = tiny_model().eval()
    out = model.translate(["21 nov 2026", "3 feb 1999"], beam_size=2)
    for tr in out:
        assert len(tr.sentinel) == len(tr.target_tokens) == tr.alpha.shape[0]
        assert all(0 <= b <= 1 for b in tr.sentinel)
        record = translation_record(tr, "argument 1", "x")
        assert record["sentinel"] == [round(b, 5) for b in tr.sentinel]
    plain = tiny_model(sentinel=False).eval().translate(["1 jan 2000"])[0]
    assert plain.sentinel is None and "sentinel" not in translation_record(plain, "a", "x")
    # The command: JSON and heatmap beside it.
    ckpt = _write_checkpoint(model, tmp_path / "m.ckpt")
    heat = tmp_path / "heat"
    assert translate_main(["--ckpt_path", str(ckpt), "--heatmap_dir", str(heat), "21 nov 2026"]) == 0
    record = json.loads(next(heat.glob("*.json")).read_text())
    assert len(record["sentinel"]) == len(record["target_tokens"]) == len(record["attention"])
    png = Image.open(next(heat.glob("*.png"))).convert("RGB")
    expected = seq2seq_heatmap(
        record["source_tokens"], record["target_tokens"], np.array(record["attention"]), sentinel=record["sentinel"]
    )
    assert png.size == expected.size
    # attention_figures hands each item's betas to the heatmap.
    seen = []
    monkeypatch.setattr(viz, "seq2seq_heatmap", lambda s, t, a, sentinel=None: seen.append((t, sentinel)) or None)
    figs = model.attention_figures(batch_of(3), max_items=3)
    assert len(figs) == 3 and all(s is not None and len(s) == len(t) for t, s in seen)


def test_options_are_checked():
    with pytest.raises(ValueError, match="sentinel"):
        AttentionLSTMDecoder(V, C, attention="none", sentinel=True)
    dec = AttentionLSTMDecoder(V, C, 8, 16, 8, attention="location", max_positions=S, sentinel=True)
    assert dec.attention.scorer.max_positions == S + 1 and dec.fixed_width == S  # one more position: the sentinel's
    assert AttentionLSTMDecoder(V, C, 8, 16, 8, sentinel=True).fixed_width is None


@pytest.mark.parametrize("query", QUERIES)
def test_a_tiny_dates_model_with_the_sentinel_learns(query):
    torch.manual_seed(0)
    model = tiny_model(query=query)
    b = batch_of(16, max_items=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = model.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::6]
    enc = model.encoder(b["source"], b["source_lengths"])
    betas = model.decoder(enc.states, b["target"][:, :-1], enc.mask, enc.summary).betas
    assert torch.isfinite(betas).all() and torch.all((betas >= 0) & (betas <= 1))
