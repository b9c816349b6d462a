"""Command line: ``captioning <command>``; ``captioning --help`` lists the commands.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands: they take
``--config configs/<experiment>.yaml``, and the datamodule's vocabulary is linked into the
model at instantiation so it is saved in every checkpoint. The other commands (``caption``,
``translate``, ...) are plain argparse programs that need only a trained model.

Every command ends a user error (see :mod:`captioning.errors`) with one line,
``error: <message>``, and exit status 2; a bug keeps its traceback (exit 1); ``--debug``
anywhere on the command line (or ``CAPTIONING_DEBUG=1``) shows every traceback. ``fit``,
``validate``, ``test`` and ``predict`` write checkpoints atomically
(:class:`captioning.io.checkpoint_files.AtomicCheckpointIO`, unless another CheckpointIO is
configured), and ``fit`` writes ``on_exception.ckpt`` into the run's checkpoint folder when an
exception stops it mid-training (:class:`captioning.io.checkpoint_files.FaultCheckpoint`).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

from captioning.commands.openmp import choose_wait_policy


# Commands that are not LightningCLI subcommands: name -> (module:function, one-line help).
COMMANDS = {
    "caption": ("captioning.commands.caption:main", "caption images or folders with a trained model; "
                "writes attention overlays (PNG) and JSON"),
    "translate": ("captioning.commands.translate:main", "translate sentences with a text model; "
                  "writes source x target heatmaps"),
    "cache-features": ("captioning.data.feature_cache:main", "encode every image of a cached config once "
                       "(features for training the decoder)"),
    "export": ("captioning.commands.share:export_main", "write a trained model as a shareable folder "
               "(safetensors, config.json, model card)"),
    "push": ("captioning.commands.share:push_main", "upload an exported model folder to the Hugging Face Hub"),
    "attach-encoder": ("captioning.commands.share:attach_main", "give a model trained on precomputed "
                       "features its image encoder"),
    "demo": ("captioning.commands.demo:main", "a local web page: caption a photo (or translate a sentence) and see "
             "where the model looked"),
}
LIGHTNING_COMMANDS = {
    "fit": "train a model from a config (then test it with --test_after_fit true)",
    "validate": "score a checkpoint on the validation split",
    "test": "score a checkpoint on the test split",
    "predict": "caption the test split into a COCO results JSON",
}

def vocab_data(datamodule: Any) -> dict:
    """The datamodule's vocabulary as plain data (image: {"itos"}, text: source/target)."""
    if hasattr(datamodule, "vocab_data"):
        return datamodule.vocab_data
    return datamodule.vocab.to_dict()


def usage() -> str:
    """``captioning --help``: every command with one line each."""
    rows = list(LIGHTNING_COMMANDS.items()) + [(name, text) for name, (_, text) in COMMANDS.items()]
    width = max(len(name) for name, _ in rows) + 2
    lines = ["usage: captioning <command> [options]   (captioning <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}{text}" for name, text in rows]
    lines += ["", "Training commands take --config configs/<experiment>.yaml (see configs/)."]
    return "\n".join(lines)


def nested_null_args(args: Sequence[str]) -> list[str]:
    """Make ``null`` work for options nested two or more class levels deep.

    jsonargparse parses ``--data.init_args.data.init_args.karpathy_json null`` to None at the
    outer level, then hands ``--karpathy_json=None`` (Python's spelling) to the inner class's
    parser, which reads the string ``'None'``. The same override given as a value of the inner
    class, ``--data.init_args.data '{"init_args": {"karpathy_json": null}}'``, is merged with the
    inner class's other settings and keeps the null: that is what this rewrites it to.
    """
    import json

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


def _with_model_for_nested_help(args: list[str]) -> list[str]:
    """``--model.encoder.help X`` needs the model class first; default to the image captioner."""
    wants = any(a.startswith(("--model.encoder.help", "--model.init_args.encoder.help")) for a in args)
    named = any(a in ("--model", "-c", "--config") or a.startswith(("--model=", "--config=")) for a in args)
    if wants and not named and args and args[0] in LIGHTNING_COMMANDS:
        return [args[0], "--model", "captioning.models.image_captioner.ImageCaptioner", *args[1:]]
    return args


def lightning_cli(args: Sequence[str] | None, run: bool = True) -> Any:
    """The LightningCLI of every training command; ``run=False`` only builds the model, data and
    trainer from the config (``cache-features`` uses that, so both parse configs alike)."""
    import importlib

    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI, _InstantiatorFn

    from captioning import registry

    registry.accept_former_module_names()  # run configs of earlier releases name the former modules
    # Imported before parsing: configs may name their classes by short names (``--model ImageCaptioner``,
    # ``class_path: SmallCNN``), and ``--model.encoder.help`` lists exactly these encoders.
    for module in registry.modules("model", "encoder"):
        importlib.import_module(module)

    class OwnHyperparameters(_InstantiatorFn):
        """Lightning's instantiator, applied only to the top-level model/datamodule.

        LightningCLI hands every LightningDataModule it instantiates the *top-level* data
        config as its hyper-parameters; a datamodule nested in another (the cached-features
        datamodule wraps an image datamodule) would record its wrapper's arguments. Nested
        ones are built plainly, so their ``save_hyperparameters()`` records their own.
        """

        def __call__(self, class_type: type, *args: Any, applied_instantiation_links: dict, **kwargs: Any) -> Any:
            self.cli._dump_config()
            top = self.cli.config_dump.get(self.key, {})
            top_class = top.get("class_path") if isinstance(top, dict) else None
            if top_class is not None and top_class != f"{class_type.__module__}.{class_type.__qualname__}":
                return class_type(*args, **kwargs)
            return super().__call__(class_type, *args, applied_instantiation_links=applied_instantiation_links,
                                    **kwargs)

    from jsonargparse import ArgumentError
    from lightning.pytorch.cli import LightningArgumentParser

    from captioning.errors import UserError, debug_mode, user_message

    class OneLineErrorsParser(LightningArgumentParser):
        """jsonargparse's parser; an error caused by a user error of ours raises it (one line in main).

        Usage errors (unknown option, wrong type) keep jsonargparse's usage + message, exit 2.
        """

        def error(self, message: str, ex: Optional[Exception] = None) -> Any:
            if self.exit_on_error:  # else jsonargparse is trying alternatives and catches the error itself
                if debug_mode():
                    raise ArgumentError(None, message) from ex
                line = user_message(ex) if ex is not None else None
                if line is not None:
                    raise UserError(line) from ex
            return super().error(message, ex)

    class CaptioningCLI(LightningCLI):
        def _add_instantiators(self) -> None:
            from lightning.pytorch.cli import _get_module_type

            self.parser.add_instantiator(OwnHyperparameters(cli=self, key="model"),
                                         _get_module_type(self._model_class), subclasses=self.subclass_mode_model)
            self.parser.add_instantiator(OwnHyperparameters(cli=self, key="data"),
                                         _get_module_type(self._datamodule_class), subclasses=self.subclass_mode_data)

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.link_arguments("data", "model.init_args.vocab", compute_fn=vocab_data, apply_on="instantiate")
            parser.add_argument("--test_after_fit", type=bool, default=False,
                                help="fit only: run `test` on the best checkpoint when training ends")
            parser.add_argument("--predictions_path", type=Optional[str], default=None,
                                help="predict only: COCO results JSON (default <log_dir>/predictions.json)")

        def _extra(self, key: str) -> Any:
            return self.config[self.subcommand].get(key) if self.subcommand else None

        def after_fit(self) -> None:
            if self._extra("test_after_fit") and not self.trainer.interrupted:
                has_best = bool(getattr(self.trainer.checkpoint_callback, "best_model_path", ""))
                self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)

        @staticmethod
        def _check_checkpoint(path: Any, weights_only: Optional[bool]) -> None:
            """Our errors for a damaged or pickled-objects checkpoint file, not torch's (module docstring)."""
            from captioning.io.checkpoint_files import CheckpointReadError, checkpoint_problem, load_checkpoint_file

            if not path or not os.path.isfile(path):
                return
            if weights_only is False:  # --weights_only false: the user trusts its pickled objects
                problem = checkpoint_problem(path)
                if problem is not None:
                    raise CheckpointReadError(f"checkpoint {path} is damaged or incomplete: {problem}")
            else:
                load_checkpoint_file(path)

        def _parse_ckpt_path(self) -> None:
            # Lightning reads --ckpt_path's hyper-parameters with torch.load before anything else.
            subcommand = self.config.get("subcommand")
            if subcommand:
                config = self.config[subcommand]
                self._check_checkpoint(config.get("ckpt_path"), config.get("weights_only"))
            super()._parse_ckpt_path()

        def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
            from lightning.pytorch.callbacks import OnExceptionCheckpoint

            from captioning.io.checkpoint_files import FaultCheckpoint, use_atomic_checkpoint_io

            trainer = super().instantiate_trainer(**kwargs)
            use_atomic_checkpoint_io(trainer)  # unless a CheckpointIO was configured
            configured = (OnExceptionCheckpoint, FaultCheckpoint)
            if self.subcommand == "fit" and not any(isinstance(cb, configured) for cb in trainer.callbacks):
                trainer.callbacks.append(FaultCheckpoint())
            return trainer

        def _resolve_ckpt_path(self, continue_run: bool = False) -> None:
            # `--ckpt_path last` finds the newest last.ckpt of earlier runs (and their W&B run).
            from captioning.io.run_folders import resolve_checkpoint

            config = self.config_init[self.subcommand]
            path = resolve_checkpoint(self.trainer, config.get("ckpt_path"), continue_run, self.model)
            self._check_checkpoint(path, config.get("weights_only"))
            config["ckpt_path"] = path

        def before_fit(self) -> None:
            self._resolve_ckpt_path(continue_run=True)

        def before_validate(self) -> None:
            self._resolve_ckpt_path()
            self._evaluate_in_run()

        before_test = before_validate

        def _evaluate_in_run(self) -> None:
            # Load the checkpoint's weights here (no saved callback states: no Timer/dirpath
            # warnings) and log into the checkpoint's own version_N folder (captioning/io/evaluation_runs.py).
            from captioning.io.evaluation_runs import restore_for_evaluation

            config = self.config_init[self.subcommand]
            config["ckpt_path"] = restore_for_evaluation(self.trainer, self.model, config.get("ckpt_path"),
                                                         self.datamodule)

        def before_predict(self) -> None:
            from captioning.io.prediction_writer import CocoResultsWriter

            self._resolve_ckpt_path()
            self._evaluate_in_run()

            self.trainer.callbacks.append(CocoResultsWriter(self._extra("predictions_path")))

    from captioning.io.run_folders import RunConfigSaver

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
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``captioning`` console script and ``python -m captioning``.

    Returns the exit status: 0, a command's own status, or 2 after ``error: <one line>`` for a
    user error (:mod:`captioning.errors`); other exceptions propagate (traceback, exit 1).
    """
    from captioning.errors import DEBUG, print_user_error, split_debug

    args, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    token = DEBUG.set(debug)
    try:
        return _run(args)
    except Exception as err:
        if debug or not print_user_error(err):
            raise
        return 2
    finally:
        DEBUG.reset(token)


def _run(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    # Before torch is imported (OpenMP reads it once): spin between operations on an idle
    # machine, sleep when other programs keep a core busy (captioning/commands/openmp.py).
    choose_wait_policy()
    if args[0] in COMMANDS:
        module, func = COMMANDS[args[0]][0].split(":")
        import importlib

        return int(getattr(importlib.import_module(module), func)(args[1:]) or 0)
    import warnings

    # main() always hands LightningCLI its (rewritten) arguments; Lightning warns when
    # sys.argv has arguments too, which is every console run.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # Lightning 2.6's own use of torch's pytree warns on every fit: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    lightning_cli(_with_model_for_nested_help(nested_null_args(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
