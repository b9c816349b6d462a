"""Self-critical sequence training: the sign of its gradient, its logs, starting from a
cross-entropy checkpoint and resuming from its own."""

from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import captioning.models.self_critical as image_captioner_module
from captioning.data.shapes import ShapesDataModule
from captioning.errors import UserError
from captioning.io.run_folders import LastOnSchedule
from captioning.models.image_captioner import ImageCaptioner
from captioning.nn.encoders import PrecomputedFeatures, SmallCNN


def _shapes(**kw):
    return ShapesDataModule(
        train_size=kw.pop("train_size", 24), val_size=4, test_size=4, batch_size=8, num_workers=0, **kw
    )


def _captioner(vocab: dict, encoder=None, **kw):
    return ImageCaptioner(
        encoder or SmallCNN(channels=8, grid_size=4, image_size=64),
        vocab=vocab,
        embed_dim=16,
        decoder_dim=32,
        attention_dim=16,
        scheduler="none",
        max_length=8,
        **kw,
    )


class _WordReward:
    """Reward 1 for a sample that contains ``word``, else 0 (stands in for CIDEr-D)."""

    def __init__(self, word: int) -> None:
        self.word = word

    def score(self, tokens, rows):
        return (tokens == self.word).any(1).float()


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_a_sample_with_a_higher_reward_gets_its_log_probability_raised(monkeypatch, baseline):
    torch.manual_seed(0)
    dm = _shapes()
    model = _captioner(
        dm.vocab.to_dict(),
        encoder=PrecomputedFeatures(grid_size=3, channels=12),
        dropout=0.0,
        self_critical=True,
        scst_samples=8,
        scst_baseline=baseline,
    )
    model.train()
    features = torch.randn(4, 9, 12)
    seen = {}
    real_sampler = image_captioner_module.sample_search

    def recording_sampler(*args, **kwargs):
        seen["samples"] = real_sampler(*args, **kwargs)
        return seen["samples"]

    monkeypatch.setattr(image_captioner_module, "sample_search", recording_sampler)
    # Reward the word the model is about as likely to sample as not: some samples hold it, some do not.
    with torch.no_grad():
        probe = real_sampler(
            model.decoder,
            model.decoder.prepare_memory(features),
            4,
            model.vocab.bos_id,
            model.vocab.eos_id,
            model.vocab.pad_id,
            num_samples=64,
            max_length=8,
        )
    counts = torch.bincount(probe.tokens.flatten(), minlength=len(model.vocab)).float() / probe.tokens.shape[0]
    counts[[model.vocab.pad_id, model.vocab.eos_id, model.vocab.bos_id]] = 0
    word = int((counts - 0.5).abs().argmin())
    model._reward = _WordReward(word)

    out = model.self_critical_losses(features, torch.arange(4))
    samples = seen["samples"]
    high = (samples.tokens == word).any(1)
    assert 0 < int(high.sum()) < len(high), "the batch must hold samples with both rewards"

    def log_probs():
        with torch.no_grad():
            tokens = samples.tokens
            inputs = torch.cat([torch.full_like(tokens[:, :1], model.vocab.bos_id), tokens[:, :-1]], 1)
            real = torch.arange(tokens.shape[1]).unsqueeze(0) < samples.lengths.unsqueeze(1)
            dec, _, _ = model.decoder.teacher_forced(features.repeat_interleave(8, 0), inputs, steps=real.sum(1))
            logits = torch.log_softmax(model.decoder.output(dec).float(), -1)
            return (logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * real).sum(1)

    before = log_probs()
    out["loss"].backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    change = log_probs() - before
    assert change[high].mean() > 0 > change[~high].mean()
    assert {"reward", "baseline", "sample_diversity"} <= set(out)
    assert ("greedy_reward" in out) == (baseline == "greedy")


def _fit(tmp_path: Path, model, dm, max_steps: int, ckpt_path=None, name="scst"):
    pl.seed_everything(0)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=max_steps,
        logger=CSVLogger(tmp_path, name=name, version=0),
        log_every_n_steps=1,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / name / "ckpt", save_last=True, every_n_train_steps=1)],
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_self_critical_fit_starts_from_a_cross_entropy_checkpoint_logs_rewards_and_resumes(tmp_path):
    dm = _shapes()
    xe = _captioner(dm.vocab.to_dict())
    _fit(tmp_path, xe, dm, max_steps=3, name="xe")
    xe_ckpt = tmp_path / "xe" / "ckpt" / "last.ckpt"

    scst = _captioner(dm.vocab.to_dict(), self_critical=True, scst_samples=3, init_from=str(xe_ckpt), lr=1e-3)
    first = _fit(tmp_path, scst, dm, max_steps=2)
    start = torch.load(xe_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert first.global_step == 2
    metrics = pd.read_csv(tmp_path / "scst" / "version_0" / "metrics.csv")
    for key in ("train/reward", "train/baseline", "train/sample_diversity", "train/loss"):
        assert metrics[key].notna().any(), key
    assert "train/ce" not in metrics, "self-critical steps have no cross-entropy"
    trained = torch.load(tmp_path / "scst" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert any(not torch.equal(trained["state_dict"][k], start[k]) for k in start), "it trained"

    # Resume: the SCST checkpoint's weights and step win over init_from.
    again = _captioner(dm.vocab.to_dict(), self_critical=True, scst_samples=3, init_from=str(xe_ckpt))
    at_start = {}
    again.on_train_start = lambda: at_start.update({k: v.clone() for k, v in again.state_dict().items()})
    resumed = _fit(tmp_path, again, dm, max_steps=3, ckpt_path=tmp_path / "scst" / "ckpt" / "last.ckpt")
    assert resumed.global_step == 3
    for k, v in trained["state_dict"].items():
        torch.testing.assert_close(at_start[k], v, rtol=0, atol=0)


# 1: Lightning judges validations at the end of the training epoch; 0.5: at each validation's end.
@pytest.mark.parametrize("val_check_interval", [1, 0.5])
def test_a_fit_from_trained_weights_keeps_them_as_best_when_its_updates_do_not_help(tmp_path, val_check_interval):
    dm = _shapes()
    xe = _captioner(dm.vocab.to_dict())
    _fit(tmp_path, xe, dm, max_steps=6, name="xe")
    xe_ckpt = tmp_path / "xe" / "ckpt" / "last.ckpt"
    start = torch.load(xe_ckpt, map_location="cpu", weights_only=True)["state_dict"]

    # A learning rate that can only wreck the model: every validation after a step is worse.
    scst = _captioner(dm.vocab.to_dict(), self_critical=True, scst_samples=3, init_from=str(xe_ckpt), lr=1.0)
    pl.seed_everything(0)
    best = ModelCheckpoint(dirpath=tmp_path / "scst" / "ckpt", monitor="val/loss", mode="min", save_last=True)
    stop = EarlyStopping(monitor="val/loss", mode="min", patience=2)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=2 if val_check_interval == 1 else 4,
        val_check_interval=val_check_interval,
        logger=CSVLogger(tmp_path, name="scst", version=0),
        log_every_n_steps=1,
        callbacks=[best, stop, LastOnSchedule()],  # as the command line sets them up
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(scst, datamodule=dm)

    val = pd.read_csv(tmp_path / "scst" / "version_0" / "metrics.csv").dropna(subset=["val/loss"])
    assert val["step"].tolist()[0] == 0, "the starting weights were validated before the first step"
    assert (val["val/loss"].iloc[1:] > val["val/loss"].iloc[0]).all(), "the updates made it worse"
    kept = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
    assert kept["global_step"] == 0
    for k, v in start.items():
        torch.testing.assert_close(kept["state_dict"][k], v, rtol=0, atol=0)
    last = torch.load(tmp_path / "scst" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2  # the run's own progress is still saved for a resume
    # Early stopping counts from the start too: two validations worse than it end the run (step 2
    # of 4); judged at the epoch end (val_check_interval 1) it cannot stop before the epoch ends.
    assert stop.best_score.item() == pytest.approx(val["val/loss"].iloc[0])
    assert trainer.global_step == 2


def test_init_from_refuses_a_model_with_another_vocabulary(tmp_path):
    dm = _shapes()
    xe = _captioner(dm.vocab.to_dict())
    _fit(tmp_path, xe, dm, max_steps=1, name="xe")
    other = dm.vocab.to_dict()
    other["itos"] = [*other["itos"], "zebra"]
    model = _captioner(other, init_from=str(tmp_path / "xe"))
    with pytest.raises(UserError, match="vocabulary is not this model's"):
        _fit(tmp_path, model, dm, max_steps=1, name="other")


def test_self_critical_options_are_checked():
    vocab = _shapes().vocab.to_dict()
    with pytest.raises(ValueError, match="scst_baseline"):
        _captioner(vocab, scst_baseline="best")
    with pytest.raises(ValueError, match="scst_samples"):
        _captioner(vocab, scst_samples=1, scst_baseline="mean")


def test_the_cross_entropy_share_is_added_to_the_self_critical_loss():
    torch.manual_seed(0)
    dm = _shapes()
    model = _captioner(
        dm.vocab.to_dict(),
        encoder=PrecomputedFeatures(grid_size=3, channels=12),
        dropout=0.0,
        self_critical=True,
        scst_samples=3,
    )
    model._reward = _WordReward(5)
    features, captions = torch.randn(2, 9, 12), torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    losses = {}
    for weight in (0.0, 0.5):
        model.hparams.scst_xe_weight = weight
        torch.manual_seed(1)  # the same samples both times
        losses[weight] = model.self_critical_losses(features, torch.arange(2), captions)
    assert "ce" not in losses[0.0]
    torch.testing.assert_close(losses[0.5]["loss"], losses[0.0]["loss"] + 0.5 * losses[0.5]["ce"])
    _, ce, _ = model.loss(features, captions)
    torch.testing.assert_close(losses[0.5]["ce"], ce)
    with pytest.raises(ValueError, match="scst_xe_weight"):
        _captioner(dm.vocab.to_dict(), scst_xe_weight=-1.0)
