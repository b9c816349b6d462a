"""The training step both LightningModules share: plain Lightning automatic optimisation on CPUs,
and on one CUDA device the whole step (forward, loss, backward, clipping, optimiser) replayed
as a CUDA graph (:mod:`captioning.models.step_graphs`).

A model says what a step computes with two methods: :meth:`TrainingStep.train_inputs` (the
batch's tensors, shapes bucketed so a few graphs serve a run) and
:meth:`TrainingStep.train_losses` (a dict with ``"loss"``, the rest logged as ``train/<name>``).

With graphs the step runs inside ``training_step`` and Lightning's own pieces of automatic
optimisation become no-ops through its public hooks: ``optimizer_step`` only runs the closure
(which calls ``training_step``), ``optimizer_zero_grad`` and ``backward`` do nothing (the graph
zeroes gradients in place and back-propagates itself), and gradient clipping uses the trainer's
``gradient_clip_val`` / ``gradient_clip_algorithm`` inside the graph. Step counting, logging,
learning-rate schedules (the learning rate becomes a device tensor they update in place),
checkpoints and resume stay Lightning's. Checkpoints hold the optimiser state in its portable
form (numbers for learning rates), so a graphed run resumes anywhere and vice versa.

Graphs are used when all of these hold (else the plain step runs, with one line saying why when
the user might have expected graphs): ``cuda_graphs`` is on (the default), the model is on a CUDA
device, one process (no DDP), no gradient accumulation, precision 32 or bf16 (fp16's loss
scaling reads the device), and the model can run a step without host synchronisation.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from captioning.errors import UserError
from captioning.hyperparameters import TypedHyperparameters
from captioning.models.step_graphs import StepGraphs, portable_optimizer_state


class NonFiniteTrainingError(UserError):
    """The training loss or the weights stopped being finite numbers; training stops there."""


class TrainingStep(TypedHyperparameters, pl.LightningModule):
    """Mixin of the models' base class: the (optionally graphed) training step (module docstring)."""

    length_bucket = 4  # caption/sentence lengths are padded to a multiple of this under graphs
    graph_backend = "cuda"  # "eager" in tests: everything but the CUDA graph itself, on a CPU
    _step_graphs: StepGraphs | None = None
    _first_non_finite: Tensor | None = None  # global step of the first non-finite loss, -1 = none yet

    # ------------------------------------------------------------------ what a model provides
    def train_inputs(self, batch: dict) -> dict[str, Tensor]:
        """The batch's tensors one training step reads (lengths padded to :attr:`length_bucket`
        when :attr:`graphed`)."""
        raise NotImplementedError

    def train_losses(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Forward pass and losses: ``{"loss": total, <name>: value, ...}`` (each logged as ``train/<name>``)."""
        raise NotImplementedError

    def can_run_step_graphs(self) -> str | None:
        """None when the training step can be captured; else why not (one line)."""
        return None

    # ------------------------------------------------------------------ the step
    @property
    def graphed(self) -> bool:
        """True while training steps are CUDA-graph replays."""
        return self._step_graphs is not None

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        inputs = self.train_inputs(batch)
        out = self._step_graphs(inputs) if self._step_graphs is not None else self.train_losses(inputs)
        self._watch_loss(out["loss"])
        size = next(iter(inputs.values())).shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=size)
        for name, value in out.items():
            if name != "loss":
                self.log(f"train/{name}", value, batch_size=size)
        return out["loss"]

    def why_no_step_graphs(self, check_optimizers: bool = True) -> str | None:
        """None when this fit's training steps can be CUDA graphs; else the reason."""
        trainer = self.trainer
        if not self.hparams.get("cuda_graphs", True):
            return "cuda_graphs is off"
        if self.device.type != "cuda" and self.graph_backend == "cuda":
            return "not on a CUDA device"
        if trainer.world_size > 1:
            return "several processes (DDP)"
        if trainer.accumulate_grad_batches != 1:
            return "gradient accumulation"
        precision = str(trainer.precision)
        if precision.startswith("16") or precision.startswith("64") or "transformer" in precision:
            return f"precision {precision} (use 32-true or bf16-mixed)"
        if check_optimizers and len(trainer.optimizers) != 1:
            return "more than one optimiser"
        return self.can_run_step_graphs()

    def on_train_start(self) -> None:
        reason = self.why_no_step_graphs()
        if reason is not None:
            if self.device.type == "cuda" and self.hparams.get("cuda_graphs", True):
                rank_zero_info(f"CUDA graphs: off ({reason}); training steps run eagerly")
            return
        trainer = self.trainer
        clip = None
        if trainer.gradient_clip_val:
            clip = (float(trainer.gradient_clip_val), str(trainer.gradient_clip_algorithm or "norm"))
        params = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]

        def step(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
            out = self.train_losses(inputs)
            out["loss"].backward()
            return out

        self._step_graphs = StepGraphs(step, trainer.optimizers[0], params, clip, backend=self.graph_backend)
        rank_zero_info("CUDA graphs: on (each training step is one graph replay; cuda_graphs: false turns this off)")

    def on_train_end(self) -> None:
        graphs = self._step_graphs
        if graphs is not None:
            self.step_graph_counts = {"graphs": graphs.captures, "replays": graphs.replays, "eager": graphs.eager_steps}
            rank_zero_info(
                f"CUDA graphs: {graphs.replays} of {graphs.replays + graphs.eager_steps} training steps were "
                f"replays of {graphs.captures} graphs"
            )
        self._step_graphs = None  # frees the graphs' memory

    # ------------------------------------------------------------------ Lightning's automatic optimisation
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if self._step_graphs is None:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        else:
            optimizer_closure()  # training_step, which ran the whole step (optimiser included)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        if self._step_graphs is None:
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        if self._step_graphs is None:
            super().backward(loss, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self.check_finite(weights=True)  # never a checkpoint of non-finite weights (as best or any other)
        for state in checkpoint.get("optimizer_states", []):
            portable_optimizer_state(state)

    # ------------------------------------------------------------------ a non-finite loss stops training
    # The loss is checked on the device (no host synchronisation per step): the step of the first
    # non-finite loss is kept in a device scalar, read every step on a CPU, every log interval on a
    # GPU, and always before validation and before any checkpoint is written, so a NaN never
    # reaches a saved checkpoint and training stops with one line naming the step.
    def _watch_loss(self, loss: Tensor) -> None:
        if self._first_non_finite is None or self._first_non_finite.device != loss.device:
            self._first_non_finite = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self._first_non_finite < 0)
        self._first_non_finite = torch.where(bad, self.trainer.global_step, self._first_non_finite)

    def check_finite(self, weights: bool = False) -> None:
        """Raise :class:`NonFiniteTrainingError` if a training loss so far (or, with ``weights``, a
        parameter) is NaN or infinite; reads the device."""
        first = -1 if self._first_non_finite is None else int(self._first_non_finite)
        if first < 0 and weights:
            params = [p.detach() for p in self.parameters()]
            if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
                first = self.trainer.global_step
        if first < 0:
            return
        raise NonFiniteTrainingError(
            f"training stopped: the loss (or the weights) became NaN or infinite at global step {first}"
            f" (epoch {self.trainer.current_epoch}); no checkpoint of these weights was written. Look for "
            "non-finite inputs or features, a learning rate too high (lower lr, set gradient_clip_val), "
            "or fp16 overflow (use bf16-mixed)"
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = 1 if self.device.type == "cpu" else max(1, int(getattr(self.trainer, "log_every_n_steps", 1) or 1))
        if self.trainer.global_step % every == 0:
            self.check_finite()

    def on_validation_start(self) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self.check_finite()


def pad_length(x: Tensor, bucket: int, pad_id: int) -> Tensor:
    """(B, L) token ids -> (B, L') with L' the next multiple of ``bucket``, filled with ``pad_id``."""
    extra = -x.shape[1] % bucket
    return x if extra == 0 else torch.nn.functional.pad(x, (0, extra), value=pad_id)
