"""Where a run keeps its files, its saved config, and how ``--ckpt_path last`` finds a run.

Run folder (:func:`run_dir`), the same one Lightning's ModelCheckpoint uses (its
``checkpoints/`` sub-folder) when no ``dirpath`` is configured:

* CSV / TensorBoard logger: ``<save_dir>/<name>/version_<N>`` (a new N per run);
* W&B logger: ``<save_dir>/<project>/<run id>``;
* no logger: ``<default_root_dir>``.

:class:`RunConfigSaver` writes the CLI config there as ``config.yaml`` (``config-1.yaml``,
... when a resumed run or a second run without logger finds one: nothing is overwritten and
nothing fails) and pushes it to W&B.

:func:`resolve_checkpoint` turns ``last`` into the newest complete ``last*.ckpt`` or
``on_exception*.ckpt`` of any earlier run of the same experiment, and prints its epoch and
step (Lightning alone only looks in the *new* run's folder, so ``last`` would
silently start from scratch) and, for W&B, makes the resumed run log to the same W&B run.

``captioning test --ckpt_path CKPT`` gives the numbers ``fit`` printed, in the checkpoint's own
run: Lightning's ``trainer.test(ckpt_path=...)`` restores the callback states saved in the
checkpoint as well as the weights (a ``Timer`` from ``max_time`` that the test run does not
have is a warning, a ``ModelCheckpoint`` whose folder is the new run's is another), and a CSV
or TensorBoard logger opens a new ``version_N`` folder for the test, away from the run it
scores. :func:`restore_for_evaluation` (called by the CLI before ``test``/``validate``) loads
the weights itself, as Lightning does for testing (``on_load_checkpoint`` hooks, then a strict
``load_state_dict``), and has Lightning test the model as it is: same weights, same numbers as
the test at the end of ``fit``, no callback states, no warnings. When the checkpoint lies in
``<logger root>/version_K/checkpoints/``, the logger writes into that ``version_K`` (CSV:
appended to its metrics.csv, never replacing the training rows).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from captioning.io.outputs import free_path

__all__ = [
    "run_dir",
    "checkpoint_dir",
    "RunConfigSaver",
    "resolve_checkpoint",
    "check_vocabulary",
    "restore_for_evaluation",
    "LastOnSchedule",
]


def callbacks_of(trainer: pl.Trainer) -> list[pl.Callback]:
    """The trainer's callbacks (Lightning sets ``trainer.callbacks`` at run time, untyped)."""
    return cast(Any, trainer).callbacks


def _versioned(logger: Any) -> bool:
    return isinstance(logger, (CSVLogger, TensorBoardLogger))


def _runs_root(trainer: pl.Trainer) -> Path | None:
    """The folder holding one sub-folder per run of this experiment (None without a logger)."""
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    if _versioned(logger):
        return Path(logger.root_dir or trainer.default_root_dir)
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name)


def run_dir(trainer: pl.Trainer) -> Path:
    """This run's folder (module docstring). Rank-local, no collective: call it on rank 0."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    if _versioned(logger):
        return Path(logger.log_dir or trainer.default_root_dir)
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"  # as ModelCheckpoint does
    return (_runs_root(trainer) or Path(trainer.default_root_dir)) / version


def checkpoint_dir(trainer: pl.Trainer) -> Path:
    """Where this run's checkpoints go: the first ModelCheckpoint's folder, else ``run_dir/checkpoints``.

    A ModelCheckpoint resolves its folder in ``setup`` (to ``run_dir/checkpoints`` when none is
    configured); before that, or without one, the same default is computed here.
    """
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath)
    return run_dir(trainer) / "checkpoints"


class RunConfigSaver(SaveConfigCallback):
    """LightningCLI's config saver, writing into the run's own folder, never over a file.

    Lightning's saver writes ``<trainer.log_dir>/config.yaml`` and fails if it exists: with W&B
    ``log_dir`` is the shared save_dir, so a second run in the same folder failed, and a resumed
    CSV run would too. Here every run has its folder (:func:`run_dir`) and an existing config
    gets a ``-1``, ``-2`` sibling. With a W&B logger the config is also pushed to the W&B run
    (``config`` entry of its config, and the YAML file among its files).
    """

    saved_path: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            folder = run_dir(trainer)
            folder.mkdir(parents=True, exist_ok=True)
            self.saved_path = free_path(folder / self.config_filename)
            self.parser.save(self.config, str(self.saved_path), skip_unset=False, multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import yaml

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and self.saved_path is not None:
                run = logger.experiment
                config = yaml.safe_load(self.saved_path.read_text(encoding="utf-8"))
                run.config.update({"config": config}, allow_val_change=True)
                run.save(str(self.saved_path), base_path=str(self.saved_path.parent), policy="now")


RESUMABLE = ("last*.ckpt", "on_exception*.ckpt")


def _newest_resumable(paths: list[Path], label: str) -> Path | None:
    """The newest complete checkpoint of ``paths``; damaged ones skipped with a warning.

    ``on_exception.ckpt`` (Ctrl-C, SIGTERM, an error) is often newer than the last scheduled
    ``last.ckpt``; a damaged file (a crash mid-write of a foreign writer) is never resumed."""
    from captioning.io.checkpoint_integrity import checkpoint_problem

    for path in sorted((p for p in paths if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        rank_zero_warn(f"{label}: skipping {path}: {problem}")
    return None


def _last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """The newest complete ``last*.ckpt`` or ``on_exception*.ckpt`` of any run of this experiment."""
    root = _runs_root(trainer)
    if root is None or not root.is_dir():
        return None
    return _newest_resumable(
        [p for pattern in RESUMABLE for p in root.glob(f"*/checkpoints/{pattern}")], "--ckpt_path last"
    )


def _checkpoint_in_folder(folder: Path, resume: bool) -> Path:
    """The checkpoint a run folder stands for: to resume (``fit``), its newest complete
    ``last*``/``on_exception*`` checkpoint; to evaluate, its best (as ``caption`` and ``translate``
    pick it: newest readable ``best*``, else ``last*``)."""
    from captioning.io.checkpoint_integrity import find_checkpoint

    if not resume:
        return find_checkpoint(folder)
    path = _newest_resumable([p for pattern in RESUMABLE for p in folder.rglob(pattern)], f"--ckpt_path {folder}")
    if path is None:
        raise FileNotFoundError(
            f"--ckpt_path {folder}: no complete last*.ckpt or on_exception*.ckpt under it to resume from"
        )
    return path


def _progress(path: Path) -> str:
    """ "epoch E, step S" saved in checkpoint ``path`` (as the resumed run counts them), or ""."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return f" (epoch {int(checkpoint['epoch'])}, step {int(checkpoint['global_step'])})"
    except Exception:  # Lightning reports an unreadable checkpoint itself
        return ""


def check_vocabulary(model: Any, path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose vocabulary differs from the one the datamodule gave ``model``.

    The CLI builds the model from the datamodule's vocabulary before loading the weights; a
    different word list of the same size would load silently and mean other words.
    """
    ours = getattr(model, "hparams", {}).get("vocab")
    try:
        theirs = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not ours to judge: Lightning reports unreadable checkpoints itself
        return
    theirs = (theirs.get("hyper_parameters") or {}).get("vocab") if isinstance(theirs, dict) else None
    if ours is not None and theirs is not None and ours != theirs:
        raise ValueError(
            f"checkpoint {path} was trained with a different vocabulary than the datamodule "
            "builds now: resume or evaluate it with the same data and vocabulary settings"
        )


def resolve_checkpoint(
    trainer: pl.Trainer, ckpt_path: str | os.PathLike | None, continue_run: bool = False, model: Any = None
) -> str | None:
    """The checkpoint a CLI subcommand should load; ``continue_run``: log to its W&B run.

    ``last`` -> the newest complete ``<runs root>/*/checkpoints/{last,on_exception}*.ckpt`` (see
    module docstring);
    unchanged when a ModelCheckpoint has a fixed ``dirpath`` or there is no logger (Lightning
    then finds it itself), or when no earlier run has one (Lightning warns and starts fresh).
    A checkpoint inside ``<save_dir>/<project>/<run id>/checkpoints/`` of our W&B logger makes
    that logger resume run ``<run id>`` (same W&B run, continuing at the checkpoint's step).
    With ``model``, a checkpoint file is first checked with :func:`check_vocabulary`.
    """
    if ckpt_path is None:
        return None
    path: Path | None = None
    if str(ckpt_path) == "last":
        fixed = any(isinstance(cb, ModelCheckpoint) and cb.dirpath for cb in callbacks_of(trainer))
        if not fixed:
            path = _last_checkpoint(trainer)
            if path is not None:
                rank_zero_info(f"--ckpt_path last: resuming from {path}{_progress(path)}")
    elif str(ckpt_path) not in ("best", "hpc", "registry") and not str(ckpt_path).startswith("registry:"):
        path = Path(ckpt_path)
        if path.is_dir():
            path = _checkpoint_in_folder(path, continue_run)
            rank_zero_info(f"--ckpt_path {ckpt_path}: using {path}{_progress(path)}")
        elif not path.is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file or run folder")
    if path is None:
        return str(ckpt_path)
    if model is not None:
        check_vocabulary(model, path)
    logger = trainer.loggers[0] if trainer.loggers else None
    resume = getattr(logger, "resume_run", None)
    if continue_run and resume is not None and path.parent.name == "checkpoints":
        root = _runs_root(trainer)
        if root is not None and path.parent.parent.parent.resolve() == root.resolve():
            resume(path.parent.parent.name)
    return str(path)


def restore_for_evaluation(
    trainer: Any, model: Any, ckpt_path: str | os.PathLike | None, datamodule: Any = None
) -> str | None:
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
        raise ValueError(
            f"checkpoint {path} does not match {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; test it with the config it was trained with"
        )
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
    if not run.name.startswith("version_") or not run.name[len("version_") :].isdigit():
        return
    if run.parent.resolve() != Path(logger.root_dir).resolve() or getattr(logger, "_experiment", None) is not None:
        return
    # Private API (listed in captioning/commands/lightning_adapter.py, checked by its test).
    logger._version = int(run.name[len("version_") :])
    if isinstance(logger, CSVLogger):
        logger._experiment = _AppendingWriter(logger.log_dir)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing metrics.csv instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="", encoding="utf-8") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))

    # Private API (listed in captioning/commands/lightning_adapter.py, checked by its test).
    def _check_log_dir_exists(self) -> None:  # the run's own folder: keep its files
        return


class LastOnSchedule(Checkpoint):
    """Makes every ``ModelCheckpoint(save_last=True)`` write ``last.ckpt`` on its schedule, and
    where ``max_time`` stops a run (see the hooks below).

    Lightning 2.6's ModelCheckpoint writes ``last.ckpt`` at a validation (or epoch end) only
    when it also saved a top-k checkpoint there, that is when the monitored metric improved:
    a run killed after validations that did not improve resumed from the last improvement,
    losing everything since. This runs after each ModelCheckpoint (Lightning orders
    checkpoint callbacks last, in their order) and, where one with ``save_last`` was due to
    save (its ``every_n_epochs``, at validation or train-epoch end as it is configured) but
    wrote nothing at this step, has it write ``last.ckpt`` now, whatever the metric did.
    Saves at ``every_n_train_steps`` already write ``last.ckpt`` every time. The CLI adds it to
    ``fit`` when a ModelCheckpoint has ``save_last``.
    """

    @staticmethod
    def _savers(trainer: pl.Trainer) -> list[ModelCheckpoint]:
        """The ModelCheckpoints with ``save_last`` that have not saved at this step yet."""
        # Private API (listed in captioning/commands/lightning_adapter.py, checked by its test).
        return [
            cb
            for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.save_last and not cb._should_skip_saving_checkpoint(trainer)
        ]

    def _catch_up(self, trainer: pl.Trainer, at_train_epoch_end: bool) -> None:
        for callback in self._savers(trainer):
            if callback._should_save_on_train_epoch_end(trainer) != at_train_epoch_end:
                continue
            every = callback._every_n_epochs
            if every >= 1 and (trainer.current_epoch + 1) % every == 0:
                callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._catch_up(trainer, at_train_epoch_end=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, at_train_epoch_end=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """``max_time`` ran out after this step: write ``last.ckpt`` here, mid-epoch, so a resume
        continues this epoch (a checkpoint written once training ended counts it as finished)."""
        if trainer.should_stop and _time_is_up(trainer):
            for callback in self._savers(trainer):
                saved_at = callback._last_global_step_saved
                callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
                # Lightning validates once more when training stops early, at this same step: the
                # ModelCheckpoint must still judge that validation (it skips a step it saved at),
                # else a better model found by the last validation is never kept as the best.
                callback._last_global_step_saved = saved_at

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """No ``Timer`` state in checkpoints: ``max_time`` limits each run, so a resumed run gets the
        whole ``max_time`` again instead of what an earlier run left of it."""
        states = checkpoint.get("callbacks")
        if isinstance(states, dict):
            for key in [k for k in states if str(k).split("{")[0] == "Timer"]:
                del states[key]


def _time_is_up(trainer: pl.Trainer) -> bool:
    from lightning.pytorch.callbacks import Timer

    for callback in callbacks_of(trainer):
        if isinstance(callback, Timer):
            remaining = callback.time_remaining()
            return remaining is not None and remaining <= 0
    return False
