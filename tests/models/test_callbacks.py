"""AttentionOverlays: what it draws, where it writes, who draws; per-image CIDEr-D."""

from __future__ import annotations

import importlib.util
import json
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from torch.utils.data import DataLoader

from captioning.data.shapes import ShapesDataModule
from captioning.eval.metrics import caption_scores
from captioning.models.callbacks import AttentionOverlays, per_image_cider
from captioning.models.image_captioner import ImageCaptioner
from captioning.nn.encoders import SmallCNN
from captioning.viz import attention_overlay, seq2seq_heatmap

PANEL = 48


def _references(n: int = 12) -> dict[int, list[str]]:
    dataset = ShapesDataModule(val_size=n).dataset("val")
    return {i: dataset.scene(i).captions for i in range(n)}


def test_per_image_cider_averages_to_corpus_cider_and_uses_corpus_statistics():
    refs = _references()
    preds = {
        i: (rs[0] if i % 3 == 0 else " ".join(rs[1].split()[:4]) if i % 3 == 1 else "a a a") for i, rs in refs.items()
    }
    scores = per_image_cider(preds, refs)
    corpus = caption_scores(preds, refs, use_java=False)["cider"]
    assert np.mean(list(scores.values())) == pytest.approx(corpus, rel=1e-12)
    assert scores[0] > scores[1] > scores[2] >= 0.0  # exact > truncated > generic caption
    # Scoring a subset keeps the document frequencies of all references.
    assert per_image_cider({4: preds[4]}, refs) == {4: pytest.approx(scores[4], rel=1e-12)}


def test_per_image_cider_needs_references_for_every_prediction():
    with pytest.raises(ValueError, match="no references for ids"):
        per_image_cider({"x": "a circle"}, {"y": ["a circle"]})


def _tiny_captioner(dm: ShapesDataModule) -> ImageCaptioner:
    return ImageCaptioner(
        SmallCNN(16, 4, width=4),
        vocab=dm.vocab.to_dict(),
        embed_dim=16,
        decoder_dim=32,
        attention_dim=16,
        beam_size=2,
        max_length=8,
        dropout=0.0,
    )


def _fit(tmp_path, callback, logger) -> pl.Trainer:
    dm = ShapesDataModule(batch_size=4, train_size=8, val_size=5)
    trainer = pl.Trainer(
        max_epochs=1,
        default_root_dir=tmp_path,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(_tiny_captioner(dm), datamodule=dm)
    return trainer


@pytest.mark.parametrize("logger", ["csv", "tensorboard", None])
def test_image_overlays_are_png_files_in_the_run_folder_without_wandb(tmp_path, monkeypatch, logger):
    monkeypatch.setenv("CAPTIONING_NO_JAVA", "1")  # no METEOR start-up: val/* scores are not checked here
    if logger == "tensorboard":
        pytest.importorskip("tensorboardX" if importlib.util.find_spec("tensorboard") is None else "tensorboard")
    make = {"csv": CSVLogger, "tensorboard": TensorBoardLogger}
    callback = AttentionOverlays(num_images=3, panel_size=PANEL)
    trainer = _fit(tmp_path, callback, make[logger](tmp_path) if logger else False)
    run = tmp_path / "lightning_logs" / "version_0" if logger else tmp_path
    folder = run / "val_attention" / f"epoch000-step{trainer.global_step:07d}"
    assert callback.last_dir == folder
    rows = json.loads((folder / "captions.json").read_text())
    assert [r["key"] for r in rows] == ["0", "1", "2"]
    assert sorted(p.name for p in folder.glob("*.png")) == ["0.png", "1.png", "2.png"]
    for row in rows:
        words = row["prediction"].split()
        expected = attention_overlay(
            np.zeros((64, 64, 3), np.uint8),
            words,
            np.zeros((len(words), 4, 4)),
            title=f"image {row['key']}",
            panel_size=PANEL,
        )
        picture = Image.open(folder / row["figure"])
        assert picture.size == expected.size  # image panel + one panel per word
        assert np.asarray(picture).std() > 10
        assert len(row["references"]) == 5 and row["cider"] >= 0.0


class _TextModel(pl.LightningModule):
    """Stands in for the text seq2seq model: validation data of sentences, the hook draws."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.hook_calls: list[int] = []

    def training_step(self, batch, batch_idx):
        return self.layer(torch.ones(1, 1)).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def attention_figures(self, batch: dict, max_items: int, panel_size: int = 128, beam_size=None) -> list[dict]:
        self.hook_calls.append(max_items)
        items = []
        for key, src, ref in list(zip(batch["ids"], batch["source_text"], batch["references"]))[:max_items]:
            words = src.split()[::-1]
            items.append(
                {
                    "key": key,
                    "input": src,
                    "prediction": " ".join(words),
                    "references": [ref],
                    "figure": seq2seq_heatmap(src.split(), words, torch.eye(len(words)).flip(1)),
                }
            )
        return items


def _text_loader() -> DataLoader:
    items = [{"id": f"s{i}", "source_text": f"w{i} x y", "reference": f"y x w{i}"} for i in range(4)]
    collate = lambda b: {
        "ids": [x["id"] for x in b],
        "source_text": [x["source_text"] for x in b],  # noqa: E731
        "references": [x["reference"] for x in b],
    }
    return DataLoader(items, batch_size=2, collate_fn=collate)


def test_models_with_attention_figures_hook_get_their_figures_saved(tmp_path):
    model, callback = _TextModel(), AttentionOverlays(num_images=2)
    trainer = pl.Trainer(
        max_epochs=1,
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        limit_train_batches=1,
    )
    trainer.fit(model, train_dataloaders=_text_loader(), val_dataloaders=_text_loader())
    assert model.hook_calls == [2]
    rows = json.loads((callback.last_dir / "captions.json").read_text())
    assert [(r["key"], r["input"], r["prediction"]) for r in rows] == [
        ("s0", "w0 x y", "y x w0"),
        ("s1", "w1 x y", "y x w1"),
    ]
    assert all(r["cider"] > 0 for r in rows)  # exact matches of their reference
    assert sorted(p.name for p in callback.last_dir.glob("*.png")) == ["s0.png", "s1.png"]


def test_only_global_rank_zero_draws_but_every_rank_gathers(tmp_path, monkeypatch):
    gathered = []
    monkeypatch.setattr("captioning.models.callbacks.gather_objects", lambda items: gathered.append(items) or items)

    class NoDrawing(_TextModel):
        def attention_figures(self, batch, max_items, panel_size=128, beam_size=None):
            raise AssertionError("a rank other than 0 drew overlays")

    callback = AttentionOverlays()
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=False)
    callback.on_validation_end(trainer, NoDrawing())
    assert gathered == [[]] and callback.last_items == []
    sanity = SimpleNamespace(sanity_checking=True, is_global_zero=True)
    callback.on_validation_end(sanity, NoDrawing())  # sanity check: nothing, not even a gather
    assert gathered == [[]]


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="num_images"):
        AttentionOverlays(num_images=0)
    with pytest.raises(ValueError, match="panel_size"):
        AttentionOverlays(panel_size=4)


def test_batches_without_images_give_one_warning_and_no_overlays(tmp_path):
    dm = ShapesDataModule(batch_size=4, train_size=8, val_size=4)
    callback = AttentionOverlays()
    batch = next(iter(dm.val_dataloader()))
    model = _tiny_captioner(dm)
    batch["features"] = model.encode(batch)
    del batch["images"]
    with pytest.warns(UserWarning, match="carry no images"):
        assert callback._figures(model, batch) == []
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert callback._figures(model, batch) == []
    assert not again, "warn once, not every epoch"
