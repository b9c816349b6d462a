"""``captioning test --ckpt_path CKPT``: the numbers ``fit`` printed, in the checkpoint's own run.

Lightning's ``trainer.test(ckpt_path=...)`` restores the callback states saved in the
checkpoint as well as the weights: a ``Timer`` (from ``max_time``) that the test run does not
have is a warning, a ``ModelCheckpoint`` whose folder is the new run's is another. And a CSV or
TensorBoard logger opens a new ``version_N`` folder for the test, away from the run it scores.

:func:`restore_for_evaluation` (called by the CLI before ``test``/``validate``) loads the
weights itself, as Lightning does for testing (``on_load_checkpoint`` hooks, then a strict
``load_state_dict``), and has Lightning test the model as it is: same weights, same numbers
as the test at the end of ``fit`` (``test_after_fit``), no callback states, no warnings. When
the checkpoint lies in ``<logger root>/version_K/checkpoints/``, the logger writes into that
``version_K`` (CSV: appended to its metrics.csv, never replacing the training rows).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

__all__ = ["restore_for_evaluation"]


def restore_for_evaluation(trainer: Any, model: Any, ckpt_path: str | os.PathLike | None,
                           datamodule: Any = None) -> str | None:
    """Load a checkpoint file's weights into ``model`` (and ``datamodule``'s saved state, if
    any) and log into its run; returns the ``ckpt_path`` to hand Lightning: None once loaded
    here; anything else passes unchanged (None, ``best``/``last``/``hpc``/registry names, a
    file torch cannot read, which Lightning then reports as usual)."""
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return None if ckpt_path is None else str(ckpt_path)
    path = Path(ckpt_path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not ours to diagnose: Lightning reports it as it would
        return str(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return str(path)
    model.on_load_checkpoint(checkpoint)
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; test it with the config it was trained with")
    datamodule = datamodule if datamodule is not None else getattr(trainer, "datamodule", None)
    state = checkpoint.get(type(datamodule).__qualname__) if datamodule is not None else None
    if state is not None:
        datamodule.load_state_dict(state)
    _log_into_run(trainer, path)
    return None


def _log_into_run(trainer: Any, path: Path) -> None:
    """Point a CSV/TensorBoard logger at the run folder holding ``path`` (see module docstring)."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if not isinstance(logger, (CSVLogger, TensorBoardLogger)) or path.parent.name != "checkpoints":
        return
    run = path.parent.parent
    if not run.name.startswith("version_") or not run.name[len("version_"):].isdigit():
        return
    if run.parent.resolve() != Path(logger.root_dir).resolve() or getattr(logger, "_experiment", None) is not None:
        return
    logger._version = int(run.name[len("version_"):])
    if isinstance(logger, CSVLogger):
        logger._experiment = _AppendingWriter(logger.log_dir)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing metrics.csv instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="", encoding="utf-8") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))

    def _check_log_dir_exists(self) -> None:  # the run's own folder: keep its files
        return
