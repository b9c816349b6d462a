"""Every piece of Lightning's private API the command line relies on (one adapter,
captioning/commands/lightning_adapter.py) still exists in the installed Lightning with the
signature the adapter was written against; and the adapter's overrides are the only ones."""

import importlib
import inspect

import pytest

from captioning.commands import lightning_adapter
from captioning.commands.lightning_adapter import PRIVATE_API, PRIVATE_ATTRIBUTES, LightningCLIAdapter


def _resolve(path: str):
    module_name, *attrs = path.split(".")
    obj = importlib.import_module(module_name)
    for i, attr in enumerate(attrs):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            obj = importlib.import_module(".".join([module_name, *attrs[: i + 1]]))
    return obj


@pytest.mark.parametrize("path,signature", sorted(PRIVATE_API.items()))
def test_the_private_api_we_use_is_still_there(path, signature):
    obj = _resolve(path)
    params = list(inspect.signature(obj).parameters.values())
    want = [p.strip().split(":")[0].split("=")[0].strip() for p in signature.split("->")[0].strip("() ").split(",")]
    assert [("*" * (p.kind == p.VAR_POSITIONAL) + "**" * (p.kind == p.VAR_KEYWORD)) + p.name for p in params] == want


def test_the_private_attributes_we_use_are_still_there(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    instances = {
        "lightning.pytorch.Trainer": Trainer(logger=False, enable_checkpointing=False, default_root_dir=tmp_path),
        "lightning.pytorch.loggers.CSVLogger": CSVLogger(tmp_path),
        "lightning.pytorch.callbacks.ModelCheckpoint": ModelCheckpoint(),
    }
    assert instances.keys() == PRIVATE_ATTRIBUTES.keys()
    for cls, names in PRIVATE_ATTRIBUTES.items():
        for name in names:
            assert hasattr(instances[cls], name), f"{cls}.{name}"


def test_the_command_line_overrides_private_methods_only_in_the_adapter():
    from captioning.commands.lightning_cli import CaptioningCLI

    private = {name for name in vars(LightningCLIAdapter) if name.startswith("_") and not name.startswith("__")}
    assert private == {"_add_instantiators", "_parse_ckpt_path"}
    assert all(f"LightningCLI.{name}" in " ".join(PRIVATE_API) for name in private)
    overridden = {name for name in vars(CaptioningCLI) if name.startswith("_") and not name.startswith("__")}
    from lightning.pytorch.cli import LightningCLI

    assert not overridden & set(dir(LightningCLI)), (
        "CaptioningCLI must override Lightning's private API only in captioning/commands/lightning_adapter.py"
    )
    assert lightning_adapter.OwnHyperparameters.__call__ is not None
