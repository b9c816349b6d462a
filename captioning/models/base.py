"""What the image captioner and the text seq2seq model share as LightningModules.

:class:`AttentionModel` holds everything that is not specific to images or text:

* decoding for metrics: :meth:`search` runs the shared greedy or batched beam search;
* evaluation: ``validation_step``/``test_step`` collect per-item records from
  :meth:`eval_items`; at the end of the epoch every rank's records are gathered, the
  distributed sampler's padding duplicates dropped (by ``eval_key``), :meth:`eval_scores` scores
  the whole corpus once, and every rank logs the same ``<stage>/<name>`` values;
* the training step (:mod:`captioning.models.train_step`): on one GPU a CUDA graph replay per step;
  TF32 for float32 products on GPUs that have it (``tf32``);
* optimisation: AdamW over :meth:`param_groups` (fused where PyTorch allows it), with
  ``scheduler`` "none", "cosine" (linear warmup, then cosine decay per step) or "plateau"
  (halve the learning rate when ``plateau_monitor`` stops improving). These are built here
  rather than from LightningCLI's ``optimizer``/``lr_scheduler`` options: the parameter groups
  (the encoder's own learning rate), the fused kernel that depends on the precision, and a
  schedule whose length is the trainer's step count are only known once the model and trainer
  exist;
* checkpoints carry the run's scores, data and an example (:mod:`captioning.io.model_card`);
* :meth:`attention_figures` is the one hook the overlay callback calls.

A subclass implements :meth:`eval_items`, :meth:`eval_scores` and :meth:`attention_figures`,
plus its loss through :meth:`train_inputs` and :meth:`train_losses`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from captioning.data.vocab import Vocabulary
from captioning.models.distributed import gather_unique
from captioning.models.train_step import TrainingStep
from captioning.nn.search import SearchResult, beam_search, greedy_search

SCHEDULERS = ("none", "cosine", "plateau")


class AttentionModel(TrainingStep):
    """Base LightningModule of both models (module docstring).

    Hyper-parameters it reads (subclasses save them): ``lr``, ``weight_decay``, ``scheduler``,
    ``warmup_steps``, ``beam_size``, ``max_length``, ``length_penalty``, ``label_smoothing``,
    ``cuda_graphs``, ``tf32``.
    """

    eval_key = "id"  # the field that identifies an evaluation record (an image or a sentence)
    count_name = "num_items"  # logged as <stage>/<count_name>: how many records were scored
    plateau_monitor = "val/loss"  # what scheduler "plateau" watches (mode: max unless it is a loss)
    example_in_checkpoint = False  # store an example input for model cards (image models)

    def __init__(self) -> None:
        super().__init__()
        self._eval_outputs: list[dict] = []
        self.last_eval: dict = {}  # id -> prediction of the last validation/test (rank-local copy)

    def setup(self, stage: str) -> None:
        from lightning.pytorch.accelerators import CUDAAccelerator

        if (
            self._trainer is not None
            and isinstance(self.trainer.accelerator, CUDAAccelerator)
            and self.hparams.get("tf32", True)
        ):
            # TF32 tensor cores for float32 products (Ampere and newer; 10 mantissa bits, float32 range).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    # ------------------------------------------------------------------ decoding
    @property
    def target_vocab(self) -> Vocabulary:
        """The vocabulary decoding writes in (caption words, target subwords)."""
        raise NotImplementedError

    def banned_ids(self, allow_unk: bool | None = None) -> list[int]:
        """Tokens decoding never emits: BOS and PAD always, ``<unk>`` unless allowed (None: the
        model's ``allow_unk``, normally off: the next likeliest token is used instead)."""
        v = self.target_vocab
        allow = self.hparams.get("allow_unk", False) if allow_unk is None else allow_unk
        return [v.bos_id, v.pad_id] + ([] if allow else [v.unk_id])

    # A model with a ``repeatable`` (captioning.nn.repeats.RepeatableNgrams) lets its repetition
    # block allow what its training captions repeat: learnt when ``fit`` starts (after any
    # init_from or resumed weights were loaded), and by ``test`` or ``validate`` for weights that
    # came without them.
    def repeatable_ngram_keys(self, n: int) -> torch.Tensor | None:
        """Sorted keys of the n-grams of size ``n`` that decoding may repeat despite
        ``no_repeat_ngram`` (those the training captions repeat, captioning.nn.repeats), or None."""
        holder = getattr(self, "repeatable", None)
        return holder.keys(n, len(self.target_vocab)) if holder is not None and n > 0 else None

    def learn_repeatable_ngrams(self, datamodule: Any) -> None:
        """Let the repetition block allow what the training captions of ``datamodule`` repeat
        ("a small" in "a small red square and a small blue circle")."""
        holder = getattr(self, "repeatable", None)
        if holder is None:
            return
        refs_of = getattr(datamodule, "caption_references", None)
        if refs_of is None:
            rank_zero_info(
                "no_repeat_ngram: the datamodule cannot list its training captions; decoding blocks every repeat"
            )
            return
        holder.learn((c.split() for caps in refs_of("train").values() for c in caps), self.target_vocab.stoi)
        n = int(self.hparams.no_repeat_ngram)
        keys = self.repeatable_ngram_keys(n)
        rank_zero_info(
            f"no_repeat_ngram {n}: decoding may repeat the {0 if keys is None else len(keys)} {n}-gram(s) "
            "that training captions repeat; it blocks every other repeat"
        )

    def _learn_missing_repeats(self) -> None:
        """Weights that came without the repeats of their training captions (fitted with the block
        off, or by an earlier version), tested or validated with the block on: learn them now, from
        the datamodule's training captions (the checkpoint has been restored by then)."""
        holder = getattr(self, "repeatable", None)
        if holder is not None and self.hparams.get("no_repeat_ngram") and not holder.ngrams.numel():
            self.learn_repeatable_ngrams(getattr(self.trainer, "datamodule", None))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.get("no_repeat_ngram"):
            self.learn_repeatable_ngrams(getattr(self.trainer, "datamodule", None))

    def on_test_start(self) -> None:
        super().on_test_start()
        self._learn_missing_repeats()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self.trainer.state.fn != "fit":
            self._learn_missing_repeats()

    def search(
        self,
        decoder: Any,
        memory: Any,
        batch_size: int,
        beam_size: int | None = None,
        max_length: int | None = None,
        max_lengths: torch.Tensor | None = None,
        allow_unk: bool | None = None,
    ) -> SearchResult:
        """Greedy (beam 1) or batched beam search over :attr:`target_vocab`, with the model's
        defaults for unset options; ``max_lengths`` (B,): each item's own cap (tokens incl. EOS),
        within ``max_length``; tokens per :meth:`banned_ids`."""
        hp, v = self.hparams, self.target_vocab
        no_repeat = int(hp.get("no_repeat_ngram", 0) or 0)
        beam = hp.beam_size if beam_size is None else beam_size
        length = hp.max_length if max_length is None else max_length
        common: dict[str, Any] = dict(
            bos_id=v.bos_id,
            eos_id=v.eos_id,
            pad_id=v.pad_id,
            max_length=length,
            banned_ids=self.banned_ids(allow_unk),
            max_lengths=max_lengths,
            no_repeat_ngram=no_repeat,
            repeatable=self.repeatable_ngram_keys(no_repeat),
        )
        if beam <= 1:
            return greedy_search(decoder, memory, batch_size, **common)
        return beam_search(decoder, memory, batch_size, beam_size=beam, length_penalty=hp.length_penalty, **common)

    # ------------------------------------------------------------------ loss
    def token_loss(self, decoder: Any, out: torch.Tensor, targets: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (with the model's ``label_smoothing``) of the decoder's output layer over
        the real target tokens: out (B, T, D) teacher-forced output vectors, targets (B, T), real
        (B, T) bool.

        Padding costs nothing where the decoder skipped it (``shrink``, CPUs: only the real
        cells go through the output layer, B*T x D x V being the largest product of a step with
        a COCO-sized vocabulary) and costs no host sync where it masked it (``mask``, GPUs: every
        cell goes through it and the loss ignores padding). Same value either way."""
        smoothing = float(self.hparams.get("label_smoothing", 0.0))
        if decoder.padding_mode(out.device) == "mask":
            logits = decoder.output(decoder.dropout(out))  # (B, T, V)
            return F.cross_entropy(
                logits.flatten(0, 1).float(),
                targets.masked_fill(~real, -100).flatten(),
                ignore_index=-100,
                label_smoothing=smoothing,
            )
        logits = decoder.output(decoder.dropout(out[real]))  # (N, V), N real tokens
        return F.cross_entropy(logits.float(), targets[real], label_smoothing=smoothing)

    def token_log_probs(
        self, decoder: Any, out: torch.Tensor, targets: torch.Tensor, real: torch.Tensor
    ) -> torch.Tensor:
        """log p of each real target token (N,), in ``targets[real]`` order (self-critical
        training): out (B, T, D) teacher-forced output vectors, targets (B, T), real (B, T) bool."""
        if decoder.padding_mode(out.device) == "mask":
            logits = decoder.output(decoder.dropout(out)).float()  # (B, T, V)
            return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)[real]
        logits = decoder.output(decoder.dropout(out[real])).float()  # (N, V)
        return torch.log_softmax(logits, -1).gather(-1, targets[real].unsqueeze(-1)).squeeze(-1)

    # ------------------------------------------------------------------ evaluation
    def eval_items(self, batch: dict, stage: str) -> list[dict]:
        """One record per item of an evaluation batch, each with ``eval_key`` and ``prediction``."""
        raise NotImplementedError

    def eval_scores(self, items: list[dict]) -> dict[str, float]:
        """Corpus scores of all records of an epoch (every rank's, duplicates removed)."""
        raise NotImplementedError

    def attention_figures(
        self, batch: dict, max_items: int, panel_size: int = 128, beam_size: int | None = None
    ) -> list[dict]:
        """Pictures of where the model looked, for the first ``max_items`` items of ``batch``:
        ``{"key", "figure" (PIL), "prediction", "references" [str], "input" (PIL or str)}``."""
        raise NotImplementedError

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_outputs.extend(self.eval_items(batch, "val"))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_outputs.extend(self.eval_items(batch, "test"))

    def on_validation_epoch_start(self) -> None:
        self._eval_outputs = []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        # Every rank gathers every record (corpus scores are not means of batch scores), drops
        # the distributed sampler's padding duplicates, and scores and logs the same numbers.
        items = gather_unique(self._eval_outputs, self.eval_key)
        self._eval_outputs = []
        if not items or self.trainer.sanity_checking:
            return
        for name, value in self.eval_scores(list(items.values())).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.log(f"{stage}/{name}", float(value), rank_zero_only=False, sync_dist=False)
        self.log(f"{stage}/{self.count_name}", float(len(items)))
        self.last_eval = {k: v.get("prediction") for k, v in items.items()}

    @property
    def fitting(self) -> bool:
        """True while ``trainer.fit`` runs (validation inside fit, not ``captioning validate``)."""
        trainer = self._trainer
        return trainer is not None and trainer.state.fn == "fit"

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict]:
        """AdamW parameter groups; default: every trainable parameter at ``lr``."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": self.hparams.lr}]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = [g for g in self.param_groups() if g["params"]]
        # Fused: one kernel for all parameters (CPU and CUDA), several times faster than the
        # per-parameter loop. Not under mixed precision (bf16 or fp16) with Lightning's own step:
        # its mixed-precision plugin refuses gradient clipping for optimizers that (could) unscale
        # gradients themselves; a graphed step clips inside the graph instead.
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        graphs = self._trainer is not None and self.why_no_step_graphs(check_optimizers=False) is None
        fused = (graphs or ("mixed" not in precision and not precision.startswith("16"))) and all(
            p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for g in groups for p in g["params"]
        )
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused or None)
        if hp.scheduler == "cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            schedule: dict[str, Any] = {"epochs_total": total, "total": total, "fitted_at": 0, "start": None}
            self._schedule = schedule

            def factor(step: int) -> float:
                total = schedule["total"]  # shortened to what max_time allows (fit_schedule_to_time)
                warm = min(hp.warmup_steps, total - 1)
                if step < warm:
                    return (step + 1) / (warm + 1)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

            sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if hp.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min" if self.plateau_monitor.endswith("loss") else "max", factor=0.5, patience=2
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": self.plateau_monitor}}
        return optimizer

    # ------------------------------------------------------------------ a schedule that fits max_time
    _schedule: dict | None = None
    SCHEDULE_FIT_FROM_STEP = 50

    def on_train_start(self) -> None:
        super().on_train_start()
        if self._schedule is not None:
            self._schedule["start"] = (self.trainer.global_step, time.monotonic())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.fit_schedule_to_time()

    def fit_schedule_to_time(self, now: float | None = None) -> None:
        """With ``trainer.max_time``, end the cosine schedule where the time will run out.

        The schedule's length is the step count of ``max_epochs`` (or ``max_steps``); when
        ``max_time`` stops training first, the learning rate would still be high at the stop
        and the last (best) weights never get the low-rate end of the schedule. From step 50 on,
        and again at 100, 200, 400, ... steps of this run, the steps that fit into the time left
        are estimated from this run's pace so far (validation included) and the schedule ends
        there (never later than the epochs allow)."""
        schedule, timer = self._schedule, self._timer()
        if schedule is None or timer is None or schedule["start"] is None:
            return
        remaining = timer.time_remaining()
        start_step, start_time = schedule["start"]
        done = self.trainer.global_step - start_step
        if remaining is None or done < self.SCHEDULE_FIT_FROM_STEP or done < 2 * schedule["fitted_at"]:
            return
        pace = ((time.monotonic() if now is None else now) - start_time) / done  # seconds a step
        fits = self.trainer.global_step + int(max(0.0, remaining) / max(pace, 1e-9))
        schedule["total"] = max(self.trainer.global_step + 1, min(schedule["epochs_total"], fits))
        schedule["fitted_at"] = done

    def _timer(self) -> Any:
        from lightning.pytorch.callbacks import Timer

        if self._trainer is None:
            return None
        return next((cb for cb in getattr(self.trainer, "callbacks", []) if isinstance(cb, Timer)), None)

    # ------------------------------------------------------------------ what loggers record
    @property
    def hparams_initial(self) -> Any:
        """The hyper-parameters loggers record (``hparams.yaml``, the W&B run config): long lists
        and tables (the vocabulary, a trained tokenizer) as their size, not written out.
        Checkpoints keep everything (``hparams``)."""
        initial = super().hparams_initial
        for key in list(initial):
            initial[key] = _summarised(initial[key])
        return initial

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Scores, data and (image models) one example with the weights (captioning.io.model_card)."""
        from captioning.io.model_card import run_summary

        super().on_save_checkpoint(checkpoint)  # the optimiser state in its portable form
        if self._trainer is not None:
            summary = run_summary(
                self.trainer, with_example=self.example_in_checkpoint, cached_example=getattr(self, "_example", None)
            )
            self._example = summary.get("example")
            checkpoint["captioning"] = summary


def _summarised(value: Any, limit: int = 20) -> Any:
    """``value`` with every list or dict of more than ``limit`` entries replaced by its size."""
    if isinstance(value, (list, tuple)):
        return f"[{len(value):,} entries]" if len(value) > limit else [_summarised(v, limit) for v in value]
    if isinstance(value, dict):
        if len(value) > limit:
            return f"{{{len(value):,} entries}}"
        return {k: _summarised(v, limit) for k, v in value.items()}
    return value


def check_scheduler(owner: str, scheduler: str, allowed: Sequence[str] = SCHEDULERS) -> None:
    if scheduler not in allowed:
        raise ValueError(f"{owner}: scheduler must be one of {', '.join(repr(s) for s in allowed)}, got {scheduler!r}")
