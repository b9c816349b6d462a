"""benchmarks/repetition_block.py on a tiny model of the built-in dataset trained here."""

import importlib.util
import json

import lightning.pytorch as pl
import pytest
import torch

from captioning.data.shapes import ShapesDataModule
from captioning.models.image_captioner import ImageCaptioner
from captioning.nn.encoders import SmallCNN

from support import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("repetition_block", ROOT / "benchmarks" / "repetition_block.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_it_scores_every_block_setting_and_refuses_other_data(tmp_path):
    dm = ShapesDataModule(train_size=24, val_size=4, test_size=4, batch_size=8, num_workers=0)
    dm.setup("fit")
    model = ImageCaptioner(
        SmallCNN(channels=8, grid_size=4, image_size=64), dm.vocab.to_dict(), embed_dim=16, decoder_dim=16,
        attention_dim=16, max_length=8,
    )  # fmt: skip
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=1)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    out = tmp_path / "figures.json"
    _module().main(["--ckpt_path", str(tmp_path / "m.ckpt"), "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["no_repeat_ngram"], r["block"]) for r in rows] == [
        (0, "none"), (2, "learnt"), (2, "every repeat"), (3, "learnt"), (3, "every repeat"),
    ]  # fmt: skip
    assert all(0.0 <= r["bleu4"] <= 1.0 and r["num_images"] == 4 for r in rows)

    ckpt = torch.load(tmp_path / "m.ckpt", map_location="cpu", weights_only=True)
    del ckpt["datamodule_hyper_parameters"]  # a model of other data
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(SystemExit, match="not trained on the built-in dataset"):
        _module().main(["--ckpt_path", str(tmp_path / "other.ckpt")])
