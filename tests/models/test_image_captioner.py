"""ImageCaptioner: loss masks padding, regulariser, decoding for metrics, checkpoint round trip."""

import json

import pytest
import torch

from captioning.data.vocab import Vocabulary
from captioning.io.model_loading import load_model, read_checkpoint
from captioning.models.image_captioner import ImageCaptioner
from captioning.nn.encoders import SmallCNN

VOCAB = Vocabulary(["a", "red", "blue", "circle", "square"])


def _model(**kw):
    args = dict(embed_dim=16, decoder_dim=24, attention_dim=16, dropout=0.0)
    args.update(kw)
    return ImageCaptioner(SmallCNN(channels=16, grid_size=4, width=4), VOCAB.to_dict(), **args)


def test_loss_ignores_padding():
    model = _model().eval()
    feats = torch.randn(2, 16, 16)
    caps = torch.tensor([[1, 4, 5, 6, 2, 0, 0], [1, 4, 7, 8, 5, 6, 2]])
    base, ce, _ = model.loss(feats, caps)
    longer = torch.cat([caps, torch.zeros(2, 3, dtype=torch.long)], 1)  # more padding
    again, ce2, _ = model.loss(feats, longer)
    torch.testing.assert_close(ce, ce2)
    torch.testing.assert_close(base, again)


@pytest.mark.parametrize("query", ["previous", "current"])
def test_loss_on_real_words_only_equals_the_full_padded_computation(query):
    """The loss skips padding steps and runs the output layer on real words only: its value and
    every gradient are those of the plain loop over all steps with a padding-ignoring
    cross-entropy (label smoothing and the doubly stochastic term included)."""
    torch.manual_seed(0)
    model = _model(query=query, alpha_c=1.0, label_smoothing=0.1).double().eval()
    feats = torch.randn(3, 16, 16, dtype=torch.double)
    caps = torch.tensor([[1, 4, 5, 6, 2, 0, 0], [1, 4, 7, 8, 5, 6, 2], [1, 5, 2, 0, 0, 0, 0]])
    total, ce, reg = model.loss(feats, caps)
    grads = torch.autograd.grad(total, list(model.decoder.parameters()))
    model.decoder.fused = False  # the reference: every step computed, padding masked in the loss
    out = model.decoder(feats, caps[:, :-1])
    want_ce = torch.nn.functional.cross_entropy(
        out.logits.reshape(-1, out.logits.shape[-1]).float(),
        caps[:, 1:].reshape(-1),
        ignore_index=0,
        label_smoothing=0.1,
    )
    real = (caps[:, 1:] != 0).unsqueeze(-1).double()
    want_reg = ((1.0 - (out.alphas * real).sum(1)) ** 2).mean()
    torch.testing.assert_close(ce, want_ce)
    torch.testing.assert_close(reg, want_reg)
    for got, want in zip(grads, torch.autograd.grad(want_ce + want_reg, list(model.decoder.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)  # the cross-entropy runs in float32


def test_doubly_stochastic_regulariser_weight():
    feats = torch.randn(2, 16, 16)
    caps = torch.tensor([[1, 4, 5, 2], [1, 6, 7, 2]])
    torch.manual_seed(0)
    with_reg = _model(alpha_c=1.0).eval()
    torch.manual_seed(0)
    without = _model(alpha_c=0.0).eval()
    total, ce, reg = with_reg.loss(feats, caps)
    assert reg > 0 and torch.isclose(total, ce + reg)
    total0, ce0, reg0 = without.loss(feats, caps)
    assert reg0 == 0 and torch.isclose(ce0, ce)


def test_generate_returns_words_and_grids():
    model = _model().eval()
    result = model.generate(torch.randn(3, 16, 16), beam_size=2, max_length=6)
    words = model.words(result)
    grids = model.attention_grids(result)
    assert len(words) == 3 and all(g.shape == (len(w), 4, 4) for w, g in zip(words, grids))
    assert all(t in VOCAB for w in words for t in w)


def test_missing_vocab_and_bad_scheduler_are_clear_errors():
    with pytest.raises(ValueError, match="vocabulary"):
        ImageCaptioner(SmallCNN(channels=8, grid_size=2, width=4), None)
    with pytest.raises(ValueError, match="scheduler"):
        _model(scheduler="sometimes")


def test_checkpoint_holds_vocab_as_plain_data_and_loads_weights_only(tmp_path):
    import lightning.pytorch as pl

    model = _model(attention="general")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=0)
    trainer.strategy.connect(model)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = read_checkpoint(path)  # torch.load(weights_only=True) inside
    assert ckpt["hyper_parameters"]["vocab"] == VOCAB.to_dict()
    assert ckpt["hyper_parameters"]["encoder"]["class_path"] == "captioning.nn.encoders.SmallCNN"
    loaded = load_model(path)
    assert loaded.vocab == VOCAB and loaded.hparams.attention == "general"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_model(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.ckpt"):
        load_model(bad)


@pytest.mark.parametrize("query", ["previous", "current"])
def test_sentinel_model_reports_beta_per_word_in_captions_json_and_overlay_table(tmp_path, query):
    from PIL import Image

    from captioning.io.results import write_caption_result
    from captioning.models.callbacks import sentinel_text
    from captioning.models.inference import caption_images

    model = ImageCaptioner(
        SmallCNN(channels=8, grid_size=2, width=4),
        VOCAB.to_dict(),
        embed_dim=8,
        decoder_dim=16,
        attention_dim=8,
        query=query,
        sentinel=True,
        beam_size=2,
        max_length=6,
    ).eval()
    with torch.no_grad():
        model.decoder.output.bias[4] = 5.0  # say "a" a few times, then whatever
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    caption = caption_images(model, [image])[0]
    assert caption.sentinel is not None and len(caption.sentinel) == len(caption.words) > 0
    assert all(0.0 <= b <= 1.0 for b in caption.sentinel)
    image.save(tmp_path / "i.png")
    _, js = write_caption_result(
        tmp_path / "out", tmp_path / "i.png", caption.words, caption.attention, image=image, sentinel=caption.sentinel
    )
    assert json.loads(js.read_text())["sentinel"] == pytest.approx(caption.sentinel, abs=1e-5)
    text = sentinel_text({"prediction": caption.text, "sentinel": caption.sentinel})
    assert text.count("|") == len(caption.words) - 1
    plain = ImageCaptioner(
        SmallCNN(channels=8, grid_size=2, width=4), VOCAB.to_dict(), embed_dim=8, decoder_dim=16, attention_dim=8
    ).eval()
    assert caption_images(plain, [image])[0].sentinel is None


@pytest.mark.parametrize("attention", ["additive", "none"])
def test_localisation_is_scored_only_for_a_model_that_attends(attention):
    model = _model(attention=attention)
    grid = model.grid_size
    alpha = torch.full((2, grid, grid), 1.0 / grid**2)
    alpha[:, 0, 0] = 1.0  # peaks in the top-left cell
    item = {
        "image_id": 0,
        "prediction": "a red circle",
        "references": ["a red circle"],
        "words": ["a", "red", "circle"],
        "alpha": torch.cat([alpha[:1], alpha]),
        "boxes": [{"box": [0.0, 0.0, 0.5, 0.5], "nouns": ["circle"]}],
    }
    scores = model.eval_scores([item])
    assert ("localisation" in scores) == (attention != "none")
    if attention != "none":
        assert scores["localisation_nouns"] == 1.0  # "circle" peaks inside its box
    assert any(k.lower().startswith("bleu") for k in scores)  # the caption metrics either way


def test_encoder_lr_null_trains_a_scratch_encoder_at_lr_and_a_pretrained_one_at_a_quarter(tmp_path):
    """The digit-scenes regression: a config's fine-tuning rate (1e-4) must not drive an encoder
    trained from scratch. ``encoder_lr: null`` picks lr for SmallCNN, lr / 4 for pretrained weights."""
    from captioning.nn.encoders import SmallCNN
    from captioning.nn.torchvision_encoder import ImageEncoder

    vocab = Vocabulary(["a", "b"]).to_dict()
    scratch = ImageCaptioner(SmallCNN(channels=8, grid_size=4, image_size=64), vocab, lr=4e-4, encoder_lr=None)
    assert [g["lr"] for g in scratch.param_groups()] == [4e-4, 4e-4]
    weights = tmp_path / "r18.pth"
    torch.save(ImageEncoder("resnet18", weights=None, grid_size=2, image_size=64).backbone.state_dict(), weights)
    tuned = ImageEncoder("resnet18", weights=None, weights_path=str(weights), grid_size=2, trainable_from="layer4")
    pretrained = ImageCaptioner(tuned, vocab, lr=4e-4, encoder_lr=None)
    assert [g["lr"] for g in pretrained.param_groups()] == [4e-4, 1e-4]
    assert ImageCaptioner(tuned, vocab, lr=4e-4, encoder_lr=3e-5).param_groups()[1]["lr"] == 3e-5  # explicit wins


def test_repetition_block_learns_the_repeats_of_training_captions_and_keeps_them_in_files(tmp_path):
    """Fit with no_repeat_ngram: the word pairs the training captions repeat ("a small" in the
    built-in scenes) stay allowed; checkpoints and exported folders keep them; weights saved
    before the model kept them load with none, and `test` learns them."""
    import lightning.pytorch as pl

    from captioning.data.shapes import ShapesDataModule
    from captioning.io.model_folders import export_model, load_pretrained

    dm = ShapesDataModule(train_size=40, val_size=4, test_size=4, batch_size=8, num_workers=0)
    dm.setup("fit")
    model = ImageCaptioner(
        SmallCNN(channels=8, grid_size=4, image_size=64), dm.vocab.to_dict(), embed_dim=16, decoder_dim=16,
        attention_dim=16, max_length=8, no_repeat_ngram=2,
    )  # fmt: skip
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=1, limit_val_batches=0
    )
    trainer.fit(model, datamodule=dm)
    v = dm.vocab
    a_small = v.stoi["a"] * len(v) + v.stoi["small"]
    keys = model.repeatable_ngram_keys(2)
    assert keys is not None and a_small in keys.tolist()
    repeats = sum(
        len(set(zip(w, w[1:]))) < len(w) - 1
        for caps in dm.caption_references("train").values()
        for w in (c.split() for c in caps)
    )
    assert repeats > 0  # the scenes' captions do repeat word pairs

    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    assert torch.equal(load_model(path).repeatable_ngram_keys(2), keys)
    folder = export_model(path, tmp_path / "folder")
    assert torch.equal(load_pretrained(folder).repeatable_ngram_keys(2), keys)

    old = torch.load(path, map_location="cpu", weights_only=True)
    del old["state_dict"]["repeatable.ngrams"]
    torch.save(old, tmp_path / "old.ckpt")
    before = load_model(tmp_path / "old.ckpt")
    assert before.repeatable_ngram_keys(2) is None
    # `test` of such weights with the block on learns them from the training captions first.
    pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(before, datamodule=dm)
    assert torch.equal(before.repeatable_ngram_keys(2), keys)
