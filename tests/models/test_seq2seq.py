"""Seq2SeqModel: it learns a synthetic task with correct alignments, logs text metrics from real
decoding, survives a checkpoint round trip, and draws attention figures."""

import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from captioning.data.batches import collate_text as collate
from captioning.data.text_tasks import SyntheticTextDataModule
from captioning.eval.metrics import alignment_score
from captioning.io.model_loading import load_model
from captioning.models.seq2seq import Seq2SeqModel

SIZES = dict(embed_dim=32, encoder_dim=32, decoder_dim=64, attention_dim=32, dropout=0.0)


def trainer(**kw):
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    args.update(kw)
    return pl.Trainer(**args)


def test_learns_dates_with_attention_on_the_true_source_positions():
    torch.manual_seed(0)
    dm = SyntheticTextDataModule(task="dates", min_items=1, max_items=2, train_size=64 * 150, batch_size=64)
    model = Seq2SeqModel(vocab=dm.vocab_data, lr=1e-2, **SIZES)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in dm.train_dataloader():
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    batch = collate(dm.examples("val", range(100)))
    result = model.generate(batch["source"], batch["source_lengths"])
    hyps = [model.detokenize(t) for t in model.hypothesis_tokens(result)]
    exact = sum(h == r for h, r in zip(hyps, batch["references"])) / 100
    _, alphas = model.loss(batch)
    align = alignment_score([alphas[i, : len(a)] for i, a in enumerate(batch["alignments"])], batch["alignments"])
    assert exact >= 0.9, list(zip(hyps, batch["references"]))[:5]
    assert align >= 0.9


@pytest.mark.parametrize("attention", ["additive", "none"])
def test_validation_logs_text_metrics_from_decoding(attention, capsys):
    dm = SyntheticTextDataModule(task="dates", max_items=2, train_size=32, val_size=24, batch_size=8)
    model = Seq2SeqModel(vocab=dm.vocab_data, attention=attention, **SIZES)
    t = trainer(limit_train_batches=2, max_epochs=1)
    t.fit(model, datamodule=dm)
    metrics = t.callback_metrics
    for key in ("val/loss", "val/bleu", "val/chrf", "val/exact_match"):
        assert key in metrics and torch.isfinite(metrics[key])
    assert 0.0 <= float(metrics["val/exact_match"]) <= 1.0
    assert ("val/alignment" in metrics) == (attention != "none")
    assert float(metrics["val/num_sentences"]) == 24
    assert model.bleu_signature and "nrefs:1" in model.bleu_signature
    assert len(model.last_eval) == 24


def test_checkpoint_round_trip_rebuilds_the_model_from_plain_data(tmp_path):
    dm = SyntheticTextDataModule(task="reverse", max_items=5, train_size=32, val_size=8, batch_size=8)
    model = Seq2SeqModel(vocab=dm.vocab_data, query="luong", attention="general", beam_size=2, **SIZES)
    t = trainer(max_steps=3, limit_val_batches=0)
    t.fit(model, datamodule=dm)
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # plain data only
    json.dumps(ckpt["hyper_parameters"]["vocab"])
    loaded = load_model(path, default_class="captioning.models.seq2seq.Seq2SeqModel")
    assert isinstance(loaded, Seq2SeqModel) and loaded.hparams.query == "luong"
    assert loaded.text_vocab.tokenizer.kind == "word"
    model.eval()
    for a, b in zip(model.translate(["a b c d", "e f"]), loaded.translate(["a b c d", "e f"])):
        assert a.text == b.text and torch.equal(a.alpha, b.alpha)


def test_translate_and_attention_figures():
    dm = SyntheticTextDataModule(task="dates", max_items=2, train_size=8, val_size=8, batch_size=8)
    model = Seq2SeqModel(vocab=dm.vocab_data, max_length=12, **SIZES).eval()
    out = model.translate(["21 Nov 2026", "3 zzz 1999"])
    assert out[0].source_tokens == ["21", "nov", "2026", "<eos>"]
    assert out[1].source_tokens[1] == "<unk>"  # unknown words are mapped, not an error
    for tr in out:
        assert tr.alpha.shape == (len(tr.target_tokens), len(tr.source_tokens))
    with pytest.raises(ValueError, match="input 2 is empty"):
        model.translate(["1 jan 2000", "   "])
    batch = next(iter(dm.val_dataloader()))
    figs = model.attention_figures(batch, max_items=3)
    assert len(figs) == 3
    for i, fig in enumerate(figs):
        assert isinstance(fig["figure"], Image.Image)
        assert fig["key"] == batch["ids"][i] and fig["input"] == batch["source_text"][i]
        assert fig["references"] == [batch["references"][i]] and isinstance(fig["prediction"], str)


def test_missing_vocab_and_bad_scheduler_are_clear_errors():
    with pytest.raises(ValueError, match="vocab_data"):
        Seq2SeqModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="scheduler"):
            Seq2SeqModel(vocab=SyntheticTextDataModule().vocab_data, scheduler="step")


def test_unk_is_never_emitted_unless_allowed():
    dm = SyntheticTextDataModule(task="dates", max_items=2, train_size=8)
    model = Seq2SeqModel(vocab=dm.vocab_data, max_length=6, **SIZES).eval()
    unk = model.text_vocab.target.unk_id
    with torch.no_grad():
        model.decoder.output.bias[unk] += 50.0  # the model would say <unk> every time
    for beam in (1, 3):
        assert all("<unk>" not in t.text for t in model.translate(["1 jan 2000", "2 feb 1999"], beam_size=beam))
        assert all("<unk>" in t.text for t in model.translate(["1 jan 2000"], beam_size=beam, allow_unk=True))
    allowed = Seq2SeqModel(vocab=dm.vocab_data, max_length=6, allow_unk=True, **SIZES).eval()
    assert unk not in allowed.banned_ids() and unk in model.banned_ids()


def test_validation_during_fit_uses_val_beam_size_and_test_the_beam(monkeypatch):
    dm = SyntheticTextDataModule(task="dates", max_items=2, train_size=16, val_size=8, test_size=8, batch_size=8)
    model = Seq2SeqModel(vocab=dm.vocab_data, beam_size=3, val_beam_size=1, **SIZES)
    beams = []
    original = model.generate

    def spy(source, lengths, beam_size=None, *args, **kwargs):
        beams.append(beam_size if beam_size is not None else model.hparams.beam_size)
        return original(source, lengths, beam_size, *args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    t = trainer(max_epochs=1)
    t.fit(model, datamodule=dm)
    assert beams and set(beams) == {1}  # fit's validation: greedy
    beams.clear()
    t.test(model, datamodule=dm)
    t.validate(model, datamodule=dm)
    assert set(beams) == {3}  # test, and a validate command: the beam
