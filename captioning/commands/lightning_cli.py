"""``captioning fit | validate | test | predict``: the LightningCLI of the training commands.

They take ``--config configs/<experiment>.yaml``; the datamodule's vocabulary is linked into the
model at instantiation so it is saved in every checkpoint. ``fit``, ``validate``, ``test`` and
``predict`` write checkpoints atomically (:class:`captioning.io.checkpoint_files.AtomicCheckpointIO`,
unless another CheckpointIO is configured), and ``fit`` writes ``on_exception.ckpt`` into the
run's checkpoint folder when an exception stops it mid-training
(:class:`captioning.io.checkpoint_files.FaultCheckpoint`). ``--ckpt_path last`` resumes the
newest run (:mod:`captioning.io.run_folders`). Where this relies on Lightning's private API is
:mod:`captioning.commands.lightning_adapter`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import operator
import os
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningArgumentParser

from captioning import registry
from captioning.commands.lightning_adapter import LightningCLIAdapter
from captioning.commands.openmp import ContentionWatch, watch_needed
from captioning.errors import UserError, debug_mode, user_message
from captioning.io.run_folders import callbacks_of

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class OneLineErrorsParser(LightningArgumentParser):
    """jsonargparse's parser; an error caused by a user error of ours raises it (one line in main).

    Usage errors (unknown option, wrong type) keep jsonargparse's usage + message, exit 2.
    """

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if self.exit_on_error:  # else jsonargparse is trying alternatives and catches the error itself
            if debug_mode():
                raise ArgumentError(None, message) from ex
            line = user_message(ex) if ex is not None else None
            if line is not None:
                raise UserError(line) from ex
        return super().error(message, ex)


class SpinContention(pl.Callback):
    """:class:`captioning.commands.openmp.ContentionWatch` between CPU training steps (rank 0 says it)."""

    def __init__(self) -> None:
        self.watch: ContentionWatch | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.root_device.type == "cpu":
            import torch
            from lightning.pytorch.utilities.rank_zero import rank_zero_warn

            self.watch = ContentionWatch(set_threads=torch.set_num_threads, say=rank_zero_warn)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.watch is not None:
            self.watch.check()


class ProgressLines(pl.Callback):
    """One line on stderr every ``every_s`` seconds of training and after each validation, for
    output that is not a terminal (a log file, a scheduler's capture), where the progress bar
    only shows once training ends. The CLI adds it to ``fit`` when stderr is not a terminal."""

    def __init__(self, every_s: float = 30.0, stream: Any = None, clock: Any = time.monotonic) -> None:
        self.every_s, self.stream, self.clock = every_s, stream, clock
        self.start = self.last = 0.0

    def _say(self, trainer: pl.Trainer, what: str) -> None:
        if not trainer.is_global_zero:
            return
        total = trainer.estimated_stepping_batches
        steps = f"step {trainer.global_step:,}" + (f"/{int(total):,}" if math.isfinite(total) else "")
        epochs = f"epoch {trainer.current_epoch + 1}" + (f"/{trainer.max_epochs}" if trainer.max_epochs else "")
        metrics = ", ".join(
            f"{k} {float(v):.4g}"
            for k, v in sorted(trainer.callback_metrics.items())
            if k.startswith(what) and getattr(v, "numel", lambda: 1)() == 1
        )
        line = f"{epochs}, {steps}, {self.clock() - self.start:.0f} s" + (f": {metrics}" if metrics else "")
        print(line, file=self.stream or sys.stderr, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self.last = self.clock()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.clock() - self.last >= self.every_s:
            self.last = self.clock()
            self._say(trainer, "train/")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._say(trainer, "val/")


class CaptioningCLI(LightningCLIAdapter):
    """The training commands' CLI (module docstring); public LightningCLI hooks only."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments(
            "data", "model.init_args.vocab", compute_fn=operator.attrgetter("vocab_data"), apply_on="instantiate"
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: run `test` on the best checkpoint when training ends",
        )
        parser.add_argument(
            "--predictions_path",
            type=str | None,
            default=None,
            help="predict only: COCO results JSON (default <log_dir>/predictions.json)",
        )

    def before_instantiate_classes(self) -> None:
        """A logger whose ``save_dir`` is ``""`` (our configs) logs under ``trainer.default_root_dir``,
        so ``--trainer.default_root_dir`` moves the whole run (logs, checkpoints, config); a
        ``save_dir`` given explicitly keeps the logs apart."""
        if not self.subcommand:
            return
        trainer = self.config[self.subcommand].get("trainer")
        if trainer is None:
            return
        root = trainer.get("default_root_dir") or os.getcwd()
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = logger.get("init_args") if hasattr(logger, "get") else None
            if init is not None and init.get("save_dir", None) == "":
                init["save_dir"] = str(root)

    def _extra(self, key: str) -> Any:
        return self.config[self.subcommand].get(key) if self.subcommand else None

    def after_fit(self) -> None:
        if self._extra("test_after_fit") and not self.trainer.interrupted:
            # The path itself, not "best": Lightning warns about "several ModelCheckpoint callbacks"
            # when LastOnSchedule (a Checkpoint too) is among them.
            best = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)

    def check_checkpoint(self, path: Any, weights_only: bool | None) -> None:
        """Our errors for a damaged or pickled-objects checkpoint file, not torch's."""
        from captioning.io.checkpoint_files import CheckpointReadError, checkpoint_problem, load_checkpoint_file

        if not path or not os.path.isfile(path):
            return
        if weights_only is False:  # --weights_only false: the user trusts its pickled objects
            problem = checkpoint_problem(path)
            if problem is not None:
                raise CheckpointReadError(f"checkpoint {path} is damaged or incomplete: {problem}")
        else:
            load_checkpoint_file(path)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

        from captioning.io.checkpoint_files import FaultCheckpoint, use_atomic_checkpoint_io
        from captioning.io.run_folders import LastOnSchedule

        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer)  # unless a CheckpointIO was configured
        callbacks = callbacks_of(trainer)
        configured = (OnExceptionCheckpoint, FaultCheckpoint)
        if self.subcommand == "fit" and not any(isinstance(cb, configured) for cb in callbacks):
            callbacks.append(FaultCheckpoint())
        if self.subcommand == "fit" and watch_needed():
            callbacks.append(SpinContention())
        if self.subcommand == "fit" and trainer.progress_bar_callback is not None and not sys.stderr.isatty():
            callbacks.append(ProgressLines())  # the bar shows only at the end when not on a terminal
        saves_last = any(isinstance(cb, ModelCheckpoint) and cb.save_last for cb in callbacks)
        if self.subcommand == "fit" and saves_last and not any(isinstance(cb, LastOnSchedule) for cb in callbacks):
            callbacks.append(LastOnSchedule())  # last.ckpt at every validation, not only on improvement
        return trainer

    def resolve_ckpt_path(self, continue_run: bool = False) -> None:
        """``--ckpt_path last`` finds the newest last.ckpt of earlier runs (and their W&B run)."""
        from captioning.io.run_folders import resolve_checkpoint

        config = self.config_init[self.subcommand]
        path = resolve_checkpoint(self.trainer, config.get("ckpt_path"), continue_run, self.model)
        self.check_checkpoint(path, config.get("weights_only"))
        config["ckpt_path"] = path

    def before_fit(self) -> None:
        self.resolve_ckpt_path(continue_run=True)

    def before_validate(self) -> None:
        self.resolve_ckpt_path()
        self.evaluate_in_run()

    before_test = before_validate

    def evaluate_in_run(self) -> None:
        """Load the checkpoint's weights here (no saved callback states: no Timer/dirpath warnings)
        and log into the checkpoint's own version_N folder (captioning.io.run_folders)."""
        from captioning.io.run_folders import restore_for_evaluation

        config = self.config_init[self.subcommand]
        config["ckpt_path"] = restore_for_evaluation(self.trainer, self.model, config.get("ckpt_path"), self.datamodule)

    def before_predict(self) -> None:
        from captioning.io.prediction_writer import CocoResultsWriter

        self.resolve_ckpt_path()
        self.evaluate_in_run()
        callbacks_of(self.trainer).append(CocoResultsWriter(self._extra("predictions_path")))


def nested_null_args(args: Sequence[str]) -> list[str]:
    """Make ``null`` work for options nested two or more class levels deep.

    jsonargparse parses ``--data.init_args.data.init_args.karpathy_json null`` to None at the
    outer level, then hands ``--karpathy_json=None`` (Python's spelling) to the inner class's
    parser, which reads the string ``'None'``. The same override given as a value of the inner
    class, ``--data.init_args.data '{"init_args": {"karpathy_json": null}}'``, is merged with the
    inner class's other settings and keeps the null: that is what this rewrites it to.
    """
    out, i = [], 0
    while i < len(args):
        key, has_value, value = args[i].partition("=")
        if not has_value and i + 1 < len(args):
            value = args[i + 1]
        parts = key.split(".init_args.") if key.startswith("--") else []
        if len(parts) >= 3 and value.strip().lower() in ("null", "none", "~"):
            nested: object = None
            for name in reversed(parts[2:]):
                nested = {"init_args": {name: nested}}
            out += [f"{parts[0]}.init_args.{parts[1]}", json.dumps(nested)]
            i += 1 if has_value else 2
            continue
        out.append(args[i])
        i += 1
    return out


def with_model_for_nested_help(args: list[str]) -> list[str]:
    """``--model.encoder.help X`` needs the model class first; default to the image captioner."""
    wants = any(a.startswith(("--model.encoder.help", "--model.init_args.encoder.help")) for a in args)
    named = any(a in ("--model", "-c", "--config") or a.startswith(("--model=", "--config=")) for a in args)
    if wants and not named and args and args[0] in SUBCOMMANDS:
        return [args[0], "--model", "captioning.models.image_captioner.ImageCaptioner", *args[1:]]
    return args


def lightning_cli(args: list[str] | None, run: bool = True) -> CaptioningCLI:
    """The LightningCLI of every training command; ``run=False`` only builds the model, data and
    trainer from the config (``cache-features`` uses that, so both parse configs alike)."""
    from captioning.io.run_folders import RunConfigSaver

    registry.accept_former_module_names()  # run configs of earlier releases name the former modules
    # Imported before parsing: configs may name their classes by short names (``--model ImageCaptioner``,
    # ``class_path: SmallCNN``), and ``--model.encoder.help`` lists exactly these encoders.
    for module in registry.modules("model", "encoder"):
        importlib.import_module(module)
    return CaptioningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        save_config_callback=RunConfigSaver,  # config.yaml in each run's folder, pushed to W&B
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        parser_class=OneLineErrorsParser,
        parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else None,
        auto_configure_optimizers=False,
    )


def _has_omegaconf() -> bool:
    return importlib.util.find_spec("omegaconf") is not None


class _NoProductTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


NO_PRODUCT_TIPS = _NoProductTips()


def main(args: Sequence[str]) -> int:
    """``captioning <fit|validate|test|predict> [options]`` (args include the subcommand)."""
    # main() always hands LightningCLI its (rewritten) arguments; Lightning warns when
    # sys.argv has arguments too, which is every console run.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # Lightning's advertisement for another product on every fit: not ours to print.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(NO_PRODUCT_TIPS)  # once: the same object
    # Lightning 2.6's own use of torch's pytree warns on every fit: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        lightning_cli(with_model_for_nested_help(nested_null_args(list(args))))
    except SIGTERMException as stopped:  # a SystemExit without a code: the run would "succeed" with 0
        notes = " ".join(getattr(stopped, "__notes__", [])) or "no checkpoint was written"
        print(f"error: {args[0] if args else 'the run'} stopped by SIGTERM; {notes}", file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM  # what a shell reports for a process the signal ended
    return 0
