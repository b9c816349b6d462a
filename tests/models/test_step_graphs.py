"""Training steps as CUDA graphs (captioning.models.step_graphs, captioning.models.train_step): through Lightning,
a graphed fit trains exactly as the plain one (clipping and a learning-rate schedule included),
reuses a few graphs, checkpoints a portable optimiser state and resumes. On a CPU the graphs are
the test backend (capture records the step, replay runs it on the static inputs): everything but
the CUDA graph itself; with a GPU the same checks run real graphs."""

import lightning.pytorch as pl
import pytest
import torch

from captioning.data.shapes import ShapesDataModule
from captioning.data.text_tasks import SyntheticTextDataModule
from captioning.models.image_captioner import ImageCaptioner
from captioning.models.seq2seq import Seq2SeqModel
from captioning.models.step_graphs import StepGraphs, portable_optimizer_state, prepare_capturable
from captioning.models.train_step import pad_length
from captioning.nn.encoders import SmallCNN

CUDA = torch.cuda.is_available()
BACKEND = "cuda" if CUDA else "eager"


def _trainer(**kw):
    args = dict(
        max_steps=8,
        accelerator="gpu" if CUDA else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.5,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    args.update(kw)
    return pl.Trainer(**args)


def _captioner(dm, graphs, **kw):
    args = dict(
        embed_dim=8,
        decoder_dim=16,
        attention_dim=8,
        dropout=0.0,
        scheduler="cosine",
        warmup_steps=2,
        lr=1e-2,
        encoder_lr=1e-2,
        cuda_graphs=graphs,
    )
    args.update(kw)
    model = ImageCaptioner(SmallCNN(channels=16, grid_size=4, image_size=64), vocab=dm.vocab.to_dict(), **args)
    model.graph_backend = BACKEND
    model.decoder.padding = "mask"  # what a GPU runs, in both arms
    return model


def _fit(graphs, trainer_args=None, **kw):
    pl.seed_everything(0)
    dm = ShapesDataModule(batch_size=8, train_size=64, val_size=8, test_size=4)
    model = _captioner(dm, graphs, **kw)
    trainer = _trainer(**(trainer_args or {}))
    trainer.fit(model, dm)
    return model, trainer


@pytest.mark.parametrize("query,sentinel", [("previous", False), ("current", True)])
def test_a_graphed_fit_trains_as_the_plain_one(query, sentinel):
    plain, _ = _fit(False, query=query, sentinel=sentinel)
    graphed, trainer = _fit(True, query=query, sentinel=sentinel)
    assert trainer.global_step == 8
    counts = graphed.step_graph_counts
    # Caption lengths of the 8 batches fall into a few buckets; each bucket warms up twice, then replays.
    assert counts["graphs"] >= 1 and counts["replays"] >= 1 and counts["replays"] + counts["eager"] == 8
    assert not hasattr(plain, "step_graph_counts")
    # Adam turns float-order differences in near-zero gradients into weight differences of up to
    # about 1e-4 after 8 steps at lr 1e-2 (the plain fit alone differs by 6.5e-5 between 1 and 2
    # threads on an AMD EPYC); a wrong step would differ by about the learning rate.
    for (name, a), b in zip(plain.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_graphed_steps_follow_the_learning_rate_schedule_and_log_the_losses():
    model, trainer = _fit(True, trainer_args=dict(max_steps=6, log_every_n_steps=1))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert all(
        abs(float(g["lr"]) - lr) < 1e-9 for g, lr in zip(trainer.optimizers[0].param_groups, scheduler.get_last_lr())
    )
    assert {"train/loss", "train/ce", "train/doubly_stochastic"} <= set(trainer.logged_metrics)
    assert torch.isfinite(trainer.logged_metrics["train/loss"])


def test_checkpoints_of_a_graphed_run_hold_a_portable_optimiser_state_and_resume(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    args = dict(
        enable_checkpointing=True,
        default_root_dir=str(tmp_path),
        max_steps=5,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=5)],
    )
    _fit(True, trainer_args=args)
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    for group in ckpt["optimizer_states"][0]["param_groups"]:
        assert isinstance(group["lr"], float) and group["capturable"] is False
    pl.seed_everything(0)
    dm = ShapesDataModule(batch_size=8, train_size=64, val_size=8, test_size=4)
    model = _captioner(dm, True)
    trainer = _trainer(max_steps=9, enable_checkpointing=False)
    trainer.fit(model, dm, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert trainer.global_step == 9 and sum(model.step_graph_counts[k] for k in ("replays", "eager")) == 4
    plain = _captioner(dm, False)
    trainer = _trainer(max_steps=9, enable_checkpointing=False)
    trainer.fit(plain, dm, ckpt_path=str(ckpt_dir / "last.ckpt"))  # and without graphs
    assert trainer.global_step == 9


def test_text_models_train_with_graphed_steps_too():
    pl.seed_everything(0)
    dm = SyntheticTextDataModule(task="dates", max_items=2, train_size=48, val_size=8, batch_size=8)
    results = []
    for graphs in (False, True):
        pl.seed_everything(0)
        model = Seq2SeqModel(
            vocab=dm.vocab_data,
            embed_dim=8,
            encoder_dim=8,
            decoder_dim=16,
            attention_dim=8,
            dropout=0.0,
            cuda_graphs=graphs,
            lr=1e-2,
        )
        model.graph_backend = BACKEND
        model.decoder.padding = "mask"
        _trainer(max_steps=6).fit(model, dm)
        results.append(model)
    plain, graphed = results
    assert graphed.step_graph_counts["replays"] >= 1
    for a, b in zip(plain.parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, atol=5e-5, rtol=1e-4)


def test_steps_are_bucketed_and_graphs_capped():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True)
    graphs = StepGraphs(lambda x: _loss(lin, x), opt, list(lin.parameters()), warmup=1, max_graphs=2, backend="eager")
    for rows in (3, 3, 3, 5, 5, 7, 7, 3):
        graphs({"x": torch.randn(rows, 4)})
    assert graphs.captures == 2  # shapes (3, 4) and (5, 4); (7, 4) is past max_graphs: it runs eagerly
    assert graphs.replays == 4 and graphs.eager_steps == 4  # one warm-up per graph, two past the cap
    assert pad_length(torch.ones(2, 5, dtype=torch.long), 4, 0).tolist() == [[1] * 5 + [0] * 3] * 2
    assert pad_length(torch.ones(2, 8, dtype=torch.long), 4, 0).shape == (2, 8)


def _loss(lin, inputs):
    loss = lin(inputs["x"]).pow(2).mean()
    loss.backward()
    return {"loss": loss}


def test_optimiser_made_capturable_keeps_its_state_and_saves_portably():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.01, fused=True)
    p.grad = torch.ones(3)
    opt.step()
    prepare_capturable(opt)
    group = opt.param_groups[0]
    assert group["capturable"] and isinstance(group["lr"], torch.Tensor) and float(group["lr"]) == pytest.approx(0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    sched.step()
    assert float(group["lr"]) == pytest.approx(0.005)  # updated in place: a graph replay would read it
    state = portable_optimizer_state(opt.state_dict())
    assert state["param_groups"][0]["lr"] == pytest.approx(0.005) and not state["param_groups"][0]["capturable"]
    assert isinstance(group["lr"], torch.Tensor) and group["capturable"]  # the live optimiser is untouched


def test_graphs_stay_off_where_they_cannot_work():
    from types import SimpleNamespace

    dm = ShapesDataModule(batch_size=8, train_size=16, val_size=4, test_size=4)
    model = _captioner(dm, True)

    def reason(**trainer):
        args = dict(world_size=1, accumulate_grad_batches=1, precision="32-true", optimizers=[object()])
        args.update(trainer)
        model._trainer = SimpleNamespace(**args)
        return model.why_no_step_graphs()

    assert reason() is None and reason(precision="bf16-mixed") is None
    assert reason(world_size=2) == "several processes (DDP)"
    assert reason(accumulate_grad_batches=2) == "gradient accumulation"
    assert reason(precision="16-mixed").startswith("precision 16-mixed")
    assert reason(optimizers=[object(), object()]) == "more than one optimiser"
    model.hparams.compile_decoder = True
    assert reason() == "compile_decoder is on"
    model.hparams.compile_decoder, model.hparams.cuda_graphs = False, False
    assert reason() == "cuda_graphs is off"
    model.hparams.cuda_graphs, model.graph_backend = True, "cuda"
    assert (reason() is None) == CUDA  # real graphs need a CUDA device
    model._trainer = None


def test_a_fit_with_gradient_accumulation_runs_eagerly():
    model, trainer = _fit(True, trainer_args=dict(max_steps=2, accumulate_grad_batches=2))
    assert trainer.global_step == 2 and not hasattr(model, "step_graph_counts")
