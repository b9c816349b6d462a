"""compile_decoder: the decoder step goes through torch.compile and gives the same results."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import torch

from captioning.data.shapes import ShapesDataModule
from captioning.models.image_captioner import ImageCaptioner, compile_decoder_step
from captioning.nn.encoders import SmallCNN


def test_compiled_decoder_step_matches_eager(monkeypatch):
    # The "eager" backend runs the real Dynamo tracing (graph capture) without needing a C++
    # compiler, so this checks the step is traceable; GPUs use the default inductor backend.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real_compile, backend="eager"))
    torch._dynamo.reset()
    dm = ShapesDataModule(batch_size=4, train_size=8, val_size=4)
    model = ImageCaptioner(
        SmallCNN(16, 4, width=4),
        vocab=dm.vocab.to_dict(),
        embed_dim=16,
        decoder_dim=32,
        attention_dim=16,
        beam_size=2,
        max_length=8,
        dropout=0.0,
    ).eval()
    batch = next(iter(dm.val_dataloader()))
    features = model.encode(batch)
    keys = list(model.state_dict())
    eager = model.generate(features)
    eager_loss = model.loss(features, batch["captions"])[0]

    from torch._dynamo.utils import counters

    counters.clear()
    compile_decoder_step(model.decoder)
    compile_decoder_step(model.decoder)  # idempotent
    compiled = model.generate(features)
    compiled_loss = model.loss(features, batch["captions"])[0]
    assert counters["stats"]["unique_graphs"] >= 1, "nothing went through Dynamo"
    assert not counters["graph_break"], f"graph breaks in the decoder step: {dict(counters['graph_break'])}"
    assert torch.equal(compiled.tokens, eager.tokens)
    torch.testing.assert_close(compiled.alphas, eager.alphas)
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert list(model.state_dict()) == keys  # checkpoints are the same with or without compiling


def test_compile_decoder_option_compiles_at_setup_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(fn.__name__) or fn)
    dm = ShapesDataModule(batch_size=4, train_size=8, val_size=4)
    plain = ImageCaptioner(
        SmallCNN(16, 4, width=4), vocab=dm.vocab.to_dict(), embed_dim=16, decoder_dim=32, attention_dim=16
    )
    plain.trainer = pl.Trainer(logger=False, enable_checkpointing=False)
    plain.setup("fit")
    assert calls == []
    model = ImageCaptioner(
        SmallCNN(16, 4, width=4),
        vocab=dm.vocab.to_dict(),
        embed_dim=16,
        decoder_dim=32,
        attention_dim=16,
        compile_decoder=True,
    )
    assert calls == []  # not at construction: loading a checkpoint for captioning stays eager
    model.trainer = pl.Trainer(logger=False, enable_checkpointing=False)
    model.setup("fit")
    model.setup("validate")
    assert sorted(calls) == ["_attend", "_cell", "step"]


def test_compiled_step_of_every_query_style_and_the_sentinel(monkeypatch):
    """The step of each decoder variant is traceable without graph breaks (Dynamo, eager backend)."""
    from torch._dynamo.utils import counters

    from captioning.nn.image_decoder import ShowAttendTellDecoder
    from captioning.nn.search import beam_search

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real_compile, backend="eager"))
    feats = torch.randn(3, 9, 16)
    for query, sentinel, heads in [("previous", True, 1), ("current", False, 1), ("current", True, 2)]:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        dec = ShowAttendTellDecoder(
            20, 16, 8, 16, 16, num_heads=heads, dropout=0.0, max_positions=9, query=query, sentinel=sentinel
        ).eval()
        eager = beam_search(dec, dec.prepare_memory(feats), 3, 1, 2, 0, beam_size=2, max_length=6)
        compile_decoder_step(dec)
        compiled = beam_search(dec, dec.prepare_memory(feats), 3, 1, 2, 0, beam_size=2, max_length=6)
        assert counters["stats"]["unique_graphs"] >= 1, "nothing went through Dynamo"
        assert not counters["graph_break"], f"graph breaks ({query}, {sentinel}): {dict(counters['graph_break'])}"
        assert torch.equal(compiled.tokens, eager.tokens)
        torch.testing.assert_close(compiled.alphas, eager.alphas)
        if sentinel:
            torch.testing.assert_close(compiled.betas, eager.betas)
