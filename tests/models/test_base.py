"""The shared model base (captioning.models.base): a cosine schedule that ends where max_time
stops training, and what loggers record of the hyper-parameters."""

from __future__ import annotations

from types import SimpleNamespace

from lightning.pytorch.callbacks import Timer

from captioning.data.text_tasks import SyntheticTextDataModule
from captioning.models.seq2seq import Seq2SeqModel


def _model() -> Seq2SeqModel:
    return Seq2SeqModel(
        vocab=SyntheticTextDataModule(task="dates").vocab_data,
        embed_dim=8,
        encoder_dim=8,
        decoder_dim=8,
        attention_dim=8,
    )


def test_the_cosine_schedule_ends_where_max_time_will_stop_training(monkeypatch):
    model = _model()
    timer = Timer(duration={"minutes": 2})
    left = {"s": 30.0}
    monkeypatch.setattr(timer, "time_remaining", lambda *a, **k: left["s"])
    model._trainer = SimpleNamespace(global_step=60, callbacks=[timer])
    model._schedule = {"epochs_total": 10_000, "total": 10_000, "fitted_at": 0, "start": (0, 100.0)}
    model.fit_schedule_to_time(now=130.0)  # 60 steps in 30 s: 0.5 s a step, 30 s left -> 60 more
    assert model._schedule["total"] == 120
    model._trainer.global_step, left["s"] = 100, 10.0
    model.fit_schedule_to_time(now=150.0)  # re-estimated only at twice the steps of the last fit
    assert model._schedule["total"] == 120
    model._trainer.global_step, left["s"] = 120, 20.0
    model.fit_schedule_to_time(now=190.0)  # slower now (validation): 90 s for 120 steps -> 26 more
    assert model._schedule["total"] == 146
    model._schedule["epochs_total"] = 250
    model._trainer.global_step = 240
    model.fit_schedule_to_time(now=200.0)  # 48 more steps would fit, but the epochs end at 250
    assert model._schedule["total"] == 250


def test_without_max_time_the_schedule_keeps_its_epoch_length():
    model = _model()
    model._trainer = SimpleNamespace(global_step=500, callbacks=[])
    model._schedule = {"epochs_total": 1000, "total": 1000, "fitted_at": 0, "start": (0, 0.0)}
    model.fit_schedule_to_time(now=10.0)
    assert model._schedule["total"] == 1000


def test_loggers_get_the_vocabulary_as_its_size():
    model = _model()
    logged = model.hparams_initial
    assert isinstance(logged["vocab"]["source"]["itos"], str) and logged["vocab"]["source"]["itos"].endswith("entries]")
    assert isinstance(model.hparams["vocab"]["source"]["itos"], list)  # the checkpoint keeps it whole
