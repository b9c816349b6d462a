"""Resume: ``--ckpt_path last`` finds the newest last.ckpt of earlier runs; a run killed with
SIGKILL mid-epoch (bf16-mixed on CPU, W&B offline) resumes and finishes with its step count,
vocabulary and W&B run."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from captioning.data.shapes import ShapesDataModule
from captioning.io.run_folders import resolve_checkpoint
from captioning.io.wandb_logging import WandbLogger

from support.cli import ROOT, SMALL, cli_command, cli_env, probe_config, read_probe, run_cli


def _touch(path: Path, mtime: float, content: bytes | None = None) -> Path:
    """A checkpoint file (a complete one unless ``content``) with modification time ``mtime``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        torch.save({"epoch": 0, "global_step": 1, "state_dict": {}}, path)
    else:
        path.write_bytes(content)
    os.utime(path, (mtime, mtime))
    return path


def _trainer(tmp_path: Path, logger, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path,
        logger=logger,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_last_finds_newest_last_checkpoint_of_earlier_versions(tmp_path):
    _touch(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", 1000)
    newest = _touch(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last-v1.ckpt", 3000)
    _touch(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt", 2000)
    _touch(tmp_path / "lightning_logs" / "version_2" / "checkpoints" / "best.ckpt", 4000)  # not a last
    trainer = _trainer(tmp_path, CSVLogger(tmp_path))
    assert resolve_checkpoint(trainer, "last") == str(newest)


def test_last_without_earlier_runs_or_with_fixed_dirpath_is_left_to_lightning(tmp_path):
    assert resolve_checkpoint(_trainer(tmp_path, CSVLogger(tmp_path)), "last") == "last"
    _touch(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", 1000)
    fixed = _trainer(tmp_path, CSVLogger(tmp_path), [ModelCheckpoint(dirpath=tmp_path / "fixed")])
    assert resolve_checkpoint(fixed, "last") == "last"  # Lightning looks in the fixed dirpath
    assert resolve_checkpoint(fixed, None) is None
    assert resolve_checkpoint(fixed, "best") == "best"


def test_explicit_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        resolve_checkpoint(_trainer(tmp_path, CSVLogger(tmp_path)), tmp_path / "nope.ckpt")


def test_resuming_a_wandb_run_folder_continues_that_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    ckpt = _touch(tmp_path / "proj" / "run123" / "checkpoints" / "last.ckpt", 1000)
    logger = WandbLogger(project="proj", save_dir=str(tmp_path))
    assert resolve_checkpoint(_trainer(tmp_path, logger), "last", continue_run=True) == str(ckpt)
    assert logger._wandb_init["id"] == "run123" and logger.version == "run123"
    # validate/test only read the checkpoint: they do not append to the training run.
    other = WandbLogger(project="proj", save_dir=str(tmp_path))
    resolve_checkpoint(_trainer(tmp_path, other), str(ckpt), continue_run=False)
    assert other._wandb_init["id"] is None


def test_checkpoint_with_another_vocabulary_is_refused(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"vocab": {"itos": ["<pad>", "a", "circle"]}}}, ckpt)
    trainer = _trainer(tmp_path, CSVLogger(tmp_path))
    same = SimpleNamespace(hparams={"vocab": {"itos": ["<pad>", "a", "circle"]}})
    assert resolve_checkpoint(trainer, ckpt, model=same) == str(ckpt)
    other = SimpleNamespace(hparams={"vocab": {"itos": ["<pad>", "circle", "a"]}})
    with pytest.raises(ValueError, match="different vocabulary"):
        resolve_checkpoint(trainer, ckpt, model=other)


STEPS_PER_EPOCH = 16  # train_size 128 / batch_size 8


@pytest.mark.e2e
def test_sigkilled_bf16_run_resumes_from_last_and_finishes(tmp_path):
    probe = tmp_path / "probe"
    every_2_steps = (
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n      init_args:\n"
        "        every_n_train_steps: 2\n        save_top_k: 0\n        save_last: true\n"
    )
    args = [
        "fit",
        *SMALL,
        "--config",
        str(ROOT / "configs" / "trainer" / "bf16.yaml"),
        "--config",
        str(ROOT / "configs" / "trainer" / "wandb.yaml"),
        "--config",
        str(ROOT / "configs" / "trainer" / "step_checkpoints.yaml"),
        "--config",
        str(probe_config(tmp_path / "probe.yaml", probe, every_2_steps)),
        "--data.init_args.train_size",
        "128",
        "--data.init_args.val_size",
        "4",
        "--trainer.accelerator",
        "cpu",
        "--trainer.default_root_dir",
        str(tmp_path / "root"),
    ]
    env = cli_env(tmp_path, WANDB_PROJECT="resume")
    proc = subprocess.Popen(
        cli_command(*args), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    try:
        while not list((tmp_path / "resume").glob("*/checkpoints/last*.ckpt")):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no mid-epoch checkpoint before the run ended: {proc.stderr.read()[-3000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    [killed_ckpt] = list((tmp_path / "resume").glob("*/checkpoints/last*.ckpt"))
    saved = torch.load(killed_ckpt, map_location="cpu", weights_only=True)
    start = saved["global_step"]
    assert saved["epoch"] == 0 and 0 < start < STEPS_PER_EPOCH, "not a mid-epoch checkpoint"

    run_cli([*args, "--ckpt_path", "last"], env, cwd=tmp_path)
    records = read_probe(probe)[0]
    starts = [r for r in records if r["event"] == "train_start"]
    end = [r for r in records if r["event"] == "train_end"][-1]
    assert [r["step"] for r in starts] == [0, start], "the resumed run must start at the checkpoint's step"
    assert end["step"] == STEPS_PER_EPOCH and end["precision"] == "bf16-mixed"
    assert math.isfinite(end["metrics"]["train/loss"]) and end["metrics"]["val/num_images"] == 4

    run_dir = killed_ckpt.parent.parent  # <WANDB_DIR>/<project>/<run id>
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == STEPS_PER_EPOCH
    assert final["hyper_parameters"]["vocab"] == ShapesDataModule().vocab.to_dict()
    wandb_runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(r.name.endswith(run_dir.name) for r in wandb_runs), (
        "the resumed run must log to the same W&B run id"
    )
    assert sorted(p.name for p in run_dir.glob("config*.yaml")) == ["config-1.yaml", "config.yaml"]


@pytest.mark.e2e
def test_a_killed_run_resumes_from_its_last_validation_even_when_the_metric_did_not_improve(tmp_path):
    """kill -9 of a real `captioning fit` after several validations whose val/cider never
    improved (learning rate 0: the metric is constant), then `--ckpt_path last`: the run resumes
    at the newest validation's step, not at the first (the only improvement)."""
    probe = tmp_path / "probe"
    args = [
        "fit",
        *SMALL,
        "--config",
        str(probe_config(tmp_path / "probe.yaml", probe)),
        "--data.init_args.train_size",
        "128",
        "--data.init_args.val_size",
        "4",
        "--trainer.val_check_interval",
        "4",
        "--trainer.max_epochs",
        "50",
        "--model.init_args.lr",
        "0",
        "--model.init_args.encoder_lr",
        "0",
        "--trainer.accelerator",
        "cpu",
        "--trainer.default_root_dir",
        str(tmp_path / "root"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
    ]
    env = cli_env(tmp_path)
    proc = subprocess.Popen(
        cli_command(*args), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240

    def after_fourth_validation() -> list[dict]:
        records = read_probe(probe).get(0, []) if probe.exists() else []
        vals = [i for i, r in enumerate(records) if r["event"] == "val_end"]
        # Two training steps after the 4th validation: its checkpoint callbacks are done.
        return records if len(vals) >= 4 and len(records) - 1 - vals[3] >= 2 else []

    try:
        while not (seen := after_fourth_validation()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run ended before 4 validations: {proc.stderr.read()[-3000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    seen = read_probe(probe)[0]
    validations = [r["step"] for r in seen if r["event"] == "val_end"]
    assert validations[:4] == [4, 8, 12, 16]
    assert len({r["metrics"]["val/cider"] for r in seen if r["event"] == "val_end"}) == 1  # never improved

    more = ["--trainer.max_epochs", str(validations[-1] // 16 + 2), "--ckpt_path", "last"]
    resumed = run_cli([*args, *more], env, cwd=tmp_path)
    starts = [r["step"] for r in read_probe(probe)[0] if r["event"] == "train_start"]
    assert starts == [0, validations[-1]], "resume must start at the newest validation's last.ckpt"
    assert f"step {validations[-1]})" in resumed.stdout + resumed.stderr  # the resume point is printed


def test_last_takes_the_newest_of_last_and_on_exception_and_skips_damaged_files(tmp_path):
    runs = tmp_path / "lightning_logs"
    _touch(runs / "version_0" / "checkpoints" / "last.ckpt", 1000)
    on_exception = runs / "version_0" / "checkpoints" / "on_exception.ckpt"
    on_exception.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "global_step": 19, "state_dict": {}}, on_exception)
    os.utime(on_exception, (2000, 2000))
    _touch(runs / "version_1" / "checkpoints" / "last.ckpt", 3000, b"x")  # newest, but damaged
    trainer = _trainer(tmp_path, CSVLogger(tmp_path))
    with pytest.warns(UserWarning, match="skipping .*version_1.*not a PyTorch checkpoint"):
        assert resolve_checkpoint(trainer, "last") == str(on_exception)


@pytest.mark.e2e
def test_sigterm_during_fit_exits_with_a_failure_status_after_saving_a_checkpoint(tmp_path):
    probe = tmp_path / "probe"
    args = [
        "fit",
        *SMALL,
        "--config",
        str(probe_config(tmp_path / "probe.yaml", probe)),
        "--data.init_args.train_size",
        "128",
        "--trainer.max_epochs",
        "50",
        "--trainer.accelerator",
        "cpu",
        "--trainer.default_root_dir",
        str(tmp_path / "root"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
    ]
    proc = subprocess.Popen(
        cli_command(*args), env=cli_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    try:
        while not (probe.exists() and sum(r["event"] == "train_batch" for r in read_probe(probe).get(0, [])) >= 3):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run ended before training: {proc.stderr.read().decode()[-3000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-3000:]
    [saved] = list((tmp_path / "runs").glob("*/version_0/checkpoints/on_exception.ckpt"))
    assert "stopped by SIGTERM" in err.decode() and f"--ckpt_path {saved}" in err.decode()


class _FirstBatch(pl.Callback):
    """Where a run's first training batch falls: (epoch, batch index in the epoch, global step)."""

    seen: tuple[int, int, int] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen is None:
            self.seen = (trainer.current_epoch, batch_idx, trainer.global_step)


def _tiny_captioner(dm: ShapesDataModule, **kwargs):
    from captioning.models.image_captioner import ImageCaptioner
    from captioning.nn.encoders import SmallCNN

    return ImageCaptioner(
        SmallCNN(channels=8, grid_size=4, image_size=64),
        vocab=dm.vocab.to_dict(),
        embed_dim=8,
        decoder_dim=16,
        attention_dim=8,
        scheduler="none",
        **kwargs,
    )


def _time_limited_fit(tmp_path: Path, ckpt_path=None, **trainer_args):
    from captioning.io.run_folders import LastOnSchedule

    pl.seed_everything(0)
    dm = ShapesDataModule(train_size=4000, val_size=2, test_size=2, batch_size=2, num_workers=0)
    model = _tiny_captioner(dm)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/cider", mode="max", save_last=True),
            LastOnSchedule(),
            _FirstBatch(),
        ],
        val_check_interval=7,  # last.ckpt at steps 7, 14, ...: the stop must not fall back to one of them
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_args,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_a_run_stopped_by_max_time_mid_epoch_resumes_in_that_epoch_with_a_fresh_time_budget(tmp_path):
    steps_per_epoch = 2000
    first = _time_limited_fit(tmp_path, max_time={"seconds": 1}, max_epochs=1)
    stopped = first.global_step
    assert 7 < stopped < steps_per_epoch, "the time limit must stop the run inside the epoch"
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == stopped and saved["epoch"] == 0
    assert not any(str(k).startswith("Timer") for k in saved["callbacks"]), "no elapsed time carried over"

    resumed = _time_limited_fit(tmp_path, ckpt_path=tmp_path / "ckpt" / "last.ckpt", max_steps=stopped + 3)
    assert resumed.global_step == stopped + 3
    first_batch = next(cb for cb in resumed.callbacks if isinstance(cb, _FirstBatch)).seen
    assert first_batch == (0, stopped, stopped), "the stopped epoch must continue, not count as finished"


def test_last_follows_every_epoch_end_validation_when_the_metric_does_not_improve(tmp_path):
    """Validation at each epoch's end (ModelCheckpoint then saves at train-epoch end), learning
    rate 0 so val/cider never improves: last.ckpt must still move on with every epoch."""
    from captioning.io.run_folders import LastOnSchedule

    pl.seed_everything(0)
    dm = ShapesDataModule(train_size=16, val_size=2, test_size=2, batch_size=8, num_workers=0)
    model = _tiny_captioner(dm, lr=0.0, encoder_lr=0.0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/cider", mode="max", save_last=True)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        callbacks=[checkpoints, LastOnSchedule()],
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert checkpoints._should_save_on_train_epoch_end(trainer)  # the mode this test is about
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (2, 6)
    assert len(list((tmp_path / "ckpt").glob("best*.ckpt")) or list((tmp_path / "ckpt").glob("epoch*.ckpt"))) == 1


class _StepScore(pl.Callback):
    """Logs val/step = the global step at every validation: each validation beats the one before."""

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log("val/step", float(trainer.global_step))


def test_the_validation_at_a_max_time_stop_can_still_give_the_best_checkpoint(tmp_path):
    """max_time stops mid-epoch, last.ckpt is written at that step, then Lightning validates once
    more at the same step: a better score there must become the best checkpoint (the one
    test_after_fit and `caption` use), not be skipped as "already saved at this step"."""
    from captioning.io.run_folders import LastOnSchedule

    pl.seed_everything(0)
    dm = ShapesDataModule(train_size=4000, val_size=2, test_size=2, batch_size=2, num_workers=0)
    best = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/step", mode="max", save_last=True, filename="best-{step}"
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[best, LastOnSchedule(), _StepScore()],
        val_check_interval=1000,  # the stop comes first: its validation is the only one
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_time={"seconds": 1},
        max_epochs=1,
    )
    trainer.fit(_tiny_captioner(dm), datamodule=dm)
    stopped = trainer.global_step
    assert 0 < stopped < 1000, "the time limit must stop the run before the first scheduled validation"
    assert best.best_model_score == stopped
    kept = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
    assert kept["global_step"] == stopped
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == stopped
