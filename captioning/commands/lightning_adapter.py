"""Where we rely on Lightning's private API: every use listed here (:data:`PRIVATE_API`,
:data:`PRIVATE_ATTRIBUTES`), and the command line's overrides defined here.
tests/commands/test_lightning_adapter.py checks each against the installed Lightning, so an
upgrade that changes one fails there, not in a user's run.

The command line's overrides (this module):

* ``LightningCLI._add_instantiators``: our instantiator (:class:`OwnHyperparameters`) instead of
  Lightning's, so a datamodule nested in another records its own hyper-parameters;
* ``LightningCLI._parse_ckpt_path``: Lightning reads ``--ckpt_path``'s hyper-parameters with
  ``torch.load`` before any hook runs; the file is checked first, with our messages;
* ``lightning.pytorch.cli._InstantiatorFn`` / ``_get_module_type``, and the CLI's
  ``_dump_config`` / ``config_dump``, which the instantiator reads.

Used where they act (the io layer sits below the commands, so it cannot call this module):

* :mod:`captioning.io.checkpoint_files`: ``Trainer._checkpoint_connector.dump_checkpoint``, the
  checkpoint written when a run fails; ``ModelCheckpoint``'s ``_should_save_on_train_epoch_end``,
  ``_should_skip_saving_checkpoint``, ``_save_last_checkpoint``, ``_monitor_candidates``,
  ``_every_n_epochs`` and ``_last_global_step_saved``, to write ``last.ckpt`` on schedule
  (:mod:`captioning.io.run_folders` ``LastOnSchedule``), and to let a validation of the weights
  a fit starts from (``init_from``) save before step 0
  (:func:`captioning.models.self_critical.validate_starting_weights`);
* :mod:`captioning.io.run_folders`: a CSV logger continuing an existing run folder sets the
  logger's ``_version`` / ``_experiment`` and overrides ``ExperimentWriter._check_log_dir_exists``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI, _get_module_type, _InstantiatorFn

PRIVATE_API = {
    "lightning.pytorch.cli.LightningCLI._add_instantiators": "(self) -> None",
    "lightning.pytorch.cli.LightningCLI._parse_ckpt_path": "(self) -> None",
    "lightning.pytorch.cli.LightningCLI._dump_config": "(self) -> None",
    "lightning.pytorch.cli._InstantiatorFn.__call__": (
        "(self, class_type, *args, applied_instantiation_links, **kwargs)"
    ),
    "lightning.pytorch.cli._get_module_type": "(value)",
    "lightning.pytorch.trainer.connectors.checkpoint_connector._CheckpointConnector.dump_checkpoint": (
        "(self, weights_only)"
    ),
    "lightning.pytorch.loggers.csv_logs.ExperimentWriter._check_log_dir_exists": "(self) -> None",
    "lightning.pytorch.callbacks.ModelCheckpoint._should_save_on_train_epoch_end": "(self, trainer) -> bool",
    "lightning.pytorch.callbacks.ModelCheckpoint._should_skip_saving_checkpoint": "(self, trainer) -> bool",
    "lightning.pytorch.callbacks.ModelCheckpoint._save_last_checkpoint": "(self, trainer, monitor_candidates) -> None",
    "lightning.pytorch.callbacks.ModelCheckpoint._monitor_candidates": "(self, trainer)",
}

# Private attributes of Lightning objects we read or set: class -> attribute names.
PRIVATE_ATTRIBUTES = {
    "lightning.pytorch.Trainer": ("_checkpoint_connector",),
    "lightning.pytorch.loggers.CSVLogger": ("_version", "_experiment"),
    "lightning.pytorch.callbacks.ModelCheckpoint": ("_every_n_epochs", "_last_global_step_saved"),
}


class OwnHyperparameters(_InstantiatorFn):
    """Lightning's instantiator, applied only to the top-level model/datamodule.

    LightningCLI hands every LightningDataModule it instantiates the *top-level* data config as
    its hyper-parameters; a datamodule nested in another (the cached-features datamodule wraps
    an image datamodule) would record its wrapper's arguments. Nested ones are built plainly, so
    their ``save_hyperparameters()`` records their own.
    """

    def __call__(self, class_type: type, *args: Any, applied_instantiation_links: dict, **kwargs: Any) -> Any:
        self.cli._dump_config()
        top = self.cli.config_dump.get(self.key, {})
        top_class = top.get("class_path") if isinstance(top, dict) else None
        if top_class is not None and top_class != f"{class_type.__module__}.{class_type.__qualname__}":
            return class_type(*args, **kwargs)
        return super().__call__(class_type, *args, applied_instantiation_links=applied_instantiation_links, **kwargs)


class LightningCLIAdapter(LightningCLI):
    """LightningCLI with the private-API overrides above; subclasses use public hooks only and
    implement :meth:`check_checkpoint`."""

    def check_checkpoint(self, path: Any, weights_only: bool | None) -> None:
        """Raise a clear error for an unusable ``--ckpt_path`` file before Lightning reads it."""

    def _add_instantiators(self) -> None:
        self.parser.add_instantiator(
            OwnHyperparameters(cli=self, key="model"),
            _get_module_type(self._model_class),
            subclasses=self.subclass_mode_model,
        )
        self.parser.add_instantiator(
            OwnHyperparameters(cli=self, key="data"),
            _get_module_type(self._datamodule_class),
            subclasses=self.subclass_mode_data,
        )

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            self.check_checkpoint(config.get("ckpt_path"), config.get("weights_only"))
        super()._parse_ckpt_path()
