"""The shared training step stops a run whose loss turns NaN or infinite (captioning.models.train_step):
one error naming the step, and no checkpoint of the broken weights, neither as best nor as last
nor as the on-exception checkpoint."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from captioning.data.shapes import ShapesDataModule
from captioning.io.checkpoint_files import FaultCheckpoint
from captioning.io.run_folders import LastOnSchedule
from captioning.models.image_captioner import ImageCaptioner
from captioning.models.train_step import NonFiniteTrainingError
from captioning.nn.encoders import SmallCNN


class NanFrom(ImageCaptioner):
    """The shapes captioner whose loss becomes NaN from global step ``nan_from`` on."""

    nan_from = 5

    def train_losses(self, inputs):
        out = super().train_losses(inputs)
        if self.trainer.global_step >= self.nan_from:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_a_nan_loss_stops_fit_naming_the_step_and_saves_no_checkpoint_of_it(tmp_path):
    pl.seed_everything(0)
    dm = ShapesDataModule(train_size=64, val_size=8, test_size=8, batch_size=8, num_workers=0)
    model = NanFrom(
        SmallCNN(channels=8, grid_size=4, image_size=64),
        vocab=dm.vocab.to_dict(),
        embed_dim=8,
        decoder_dim=16,
        attention_dim=8,
        beam_size=1,
        max_length=6,
        scheduler="none",
    )
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/cider", mode="max", save_top_k=1, save_last=True
    )
    trainer = pl.Trainer(
        max_epochs=3,
        val_check_interval=2,
        accelerator="cpu",
        logger=False,
        callbacks=[checkpoints, LastOnSchedule(), FaultCheckpoint(dirpath=str(tmp_path / "ckpt"))],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with pytest.raises(NonFiniteTrainingError, match=r"NaN or infinite at global step 5 \(epoch 0\)"):
        trainer.fit(model, datamodule=dm)
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved and "on_exception.ckpt" not in saved
    for name in saved:
        state = torch.load(tmp_path / "ckpt" / name, map_location="cpu", weights_only=True)
        assert state["global_step"] <= 5, name  # saved before the NaN step ran
        assert all(torch.isfinite(t).all() for t in state["state_dict"].values()), name
