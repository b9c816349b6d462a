"""Command line: ``captioning fit|validate|test|predict`` (LightningCLI) and ``captioning caption``.

``fit`` & co. take ``--config configs/<experiment>.yaml``; the datamodule's vocabulary is
linked into the model at instantiation so it is saved in every checkpoint.
``caption`` needs only a checkpoint: it captions image files in batches, prints one line
per image and writes an attention overlay PNG and a JSON per image.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

# Before torch is imported: OpenMP threads that spin while waiting make a 2-core machine
# shared with data loading several times slower; passive waiting costs little elsewhere.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COMMANDS = {
    "caption": "captioning.caption_command:main",
    "translate": "captioning.translate_command:main",
    "cache-features": "captioning.features:main",
}


def vocab_data(datamodule: Any) -> dict:
    """The datamodule's vocabulary as plain data (image: {"itos"}, text: source/target)."""
    if hasattr(datamodule, "vocab_data"):
        return datamodule.vocab_data
    return datamodule.vocab.to_dict()


def _lightning_cli(args: Sequence[str] | None) -> Any:
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    class CaptioningCLI(LightningCLI):
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

        def _resolve_ckpt_path(self, continue_run: bool = False) -> None:
            # `--ckpt_path last` finds the newest last.ckpt of earlier runs (and their W&B run).
            from captioning.runs import resolve_checkpoint

            config = self.config_init[self.subcommand]
            config["ckpt_path"] = resolve_checkpoint(self.trainer, config.get("ckpt_path"), continue_run, self.model)

        def before_fit(self) -> None:
            self._resolve_ckpt_path(continue_run=True)

        def before_validate(self) -> None:
            self._resolve_ckpt_path()

        before_test = before_validate

        def before_predict(self) -> None:
            from captioning.prediction_writer import CocoResultsWriter

            self.trainer.callbacks.append(CocoResultsWriter(self._extra("predictions_path")))

    from captioning.runs import RunConfigSaver

    return CaptioningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        save_config_callback=RunConfigSaver,  # config.yaml in each run's folder, pushed to W&B
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
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
    """Entry point of the ``captioning`` console script and ``python -m captioning``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        module, func = COMMANDS[args[0]].split(":")
        import importlib

        return int(getattr(importlib.import_module(module), func)(args[1:]) or 0)
    _lightning_cli(None if argv is None else args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
