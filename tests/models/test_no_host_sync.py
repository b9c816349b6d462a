"""The training step that runs on GPUs (padding masked, not skipped) reads nothing back to the host:
the whole step (forward, loss, backward, clipping, optimiser) of both models runs under a guard
that fails on ``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()``, boolean indexing,
``nonzero`` and the like, for every score, head count, query style and the sentinel; the
padding-skipping CPU path is caught by the same guard. Both ways of handling padding give the
same loss and gradients."""

import itertools

import pytest
import torch

from captioning.data.batches import collate_text
from captioning.data.text_tasks import SyntheticTextDataModule
from captioning.data.vocab import Vocabulary
from captioning.models.image_captioner import ImageCaptioner
from captioning.models.seq2seq import Seq2SeqModel
from captioning.nn.attention import SCORERS
from captioning.nn.encoders import SmallCNN

from support.host_sync import HostSync, no_host_sync

VOCAB = Vocabulary(["a", "red", "blue", "circle", "square", "left", "of"]).to_dict()
CAPTIONS = torch.tensor([[1, 4, 5, 6, 2, 0, 0], [1, 4, 7, 8, 5, 6, 2], [1, 5, 2, 0, 0, 0, 0]])


def _captioner(padding, **kw):
    torch.manual_seed(0)
    args = dict(embed_dim=8, decoder_dim=16, attention_dim=8, alpha_c=1.0, label_smoothing=0.1, dropout=0.0)
    args.update(kw)
    model = ImageCaptioner(SmallCNN(channels=16, grid_size=4, width=4), VOCAB, **args)
    model.decoder.padding = padding
    return model


def _step(model, batch, optimizer):
    """What a graphed step runs: zero, forward + backward, clip, optimiser step."""
    optimizer.zero_grad(set_to_none=False)
    out = model.train_losses(model.train_inputs(batch))
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 5.0, foreach=True)
    optimizer.step()
    return out


@pytest.mark.parametrize(
    "score,heads,query,sentinel",
    [
        (score, heads, query, sentinel)
        for score, heads, (query, sentinel) in itertools.product(
            sorted(SCORERS), [1, 2], [("previous", False), ("previous", True), ("current", False), ("current", True)]
        )
    ],
)
def test_the_gpu_training_step_of_the_captioner_reads_nothing_back(score, heads, query, sentinel):
    model = _captioner("mask", attention=score, num_heads=heads, query=query, sentinel=sentinel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # fused: its step count stays a tensor
    batch = {"features": torch.randn(3, 16, 16), "captions": CAPTIONS}
    _step(model, batch, optimizer)  # the optimiser's state is created on its first step
    with no_host_sync():
        _step(model, batch, optimizer)


def test_from_images_too_and_the_cpu_path_is_caught_by_the_guard():
    model = _captioner("mask")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    batch = {"images": torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8), "captions": CAPTIONS}
    _step(model, batch, optimizer)
    with no_host_sync():
        _step(model, batch, optimizer)
    model.decoder.padding = "shrink"  # reads the lengths and indexes the real words: not for CUDA graphs
    with pytest.raises(HostSync), no_host_sync():
        _step(model, batch, optimizer)


def _text_model(padding, **kw):
    torch.manual_seed(0)
    dm = SyntheticTextDataModule(task="dates", max_items=3, train_size=8)
    model = Seq2SeqModel(
        vocab=dm.vocab_data, embed_dim=8, encoder_dim=8, decoder_dim=16, attention_dim=8, label_smoothing=0.1, **kw
    )
    model.decoder.padding = padding
    batch = collate_text(dm.examples("train", range(6)))
    return model, {k: batch[k] for k in ("source", "source_lengths", "target")}


@pytest.mark.parametrize("query,sentinel,layers", [("bahdanau", False, 1), ("luong", True, 2), ("bahdanau", True, 2)])
def test_the_gpu_training_step_of_the_text_model_reads_nothing_back(query, sentinel, layers):
    model, batch = _text_model("mask", query=query, sentinel=sentinel, encoder_layers=layers, max_source_length=12)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    _step(model, batch, optimizer)
    with no_host_sync():
        _step(model, batch, optimizer)


@pytest.mark.parametrize("query", ["previous", "current"])
def test_captioner_loss_and_gradients_do_not_depend_on_how_padding_is_handled(query):
    feats = torch.randn(3, 16, 16)
    results = []
    for padding in ("shrink", "mask"):
        model = _captioner(padding, query=query).double()
        total, ce, reg = model.loss(feats.double(), CAPTIONS)
        results.append((total, torch.autograd.grad(total, list(model.parameters()), allow_unused=True)))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)  # the cross-entropy runs in float32


@pytest.mark.parametrize("query", ["bahdanau", "luong"])
def test_text_loss_and_gradients_do_not_depend_on_how_padding_is_handled(query):
    results = []
    for padding in ("shrink", "mask"):
        model, batch = _text_model(padding, query=query, encoder_layers=2, dropout=0.0)
        model = model.double()
        loss, _ = model.loss(batch)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
