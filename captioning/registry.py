"""The classes this package ships, listed once.

Everything that needs to know them reads them from here: the command line (which imports their
modules so configs may name a class by its short name, and lists the encoders in ``--help``),
:mod:`captioning.io.trust` (the only classes a model file may make us build without the user's
trust), and :mod:`captioning.nn.encoders` (``encoder_config``).

Earlier releases kept these classes in other modules (``captioning.image_model``,
``datamodules.shapes``, ...). Checkpoints, exported model folders and run configs that name the
old places keep working: :func:`current_class_path` maps a class path to where the class lives
now, and :func:`accept_former_module_names` lets the command line import a config's old module
names (a stand-in module that hands out the shipped classes, wherever they live now).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

# kind -> class name -> module
SHIPPED: dict[str, dict[str, str]] = {
    "model": {
        "ImageCaptioner": "captioning.models.image_captioner",
        "Seq2SeqModel": "captioning.models.seq2seq",
    },
    "encoder": {
        "ImageEncoder": "captioning.nn.torchvision_encoder",
        "SmallCNN": "captioning.nn.encoders",
        "PrecomputedFeatures": "captioning.nn.encoders",
        "TimmEncoder": "captioning.nn.timm_encoder",
    },
    "datamodule": {
        "ShapesDataModule": "captioning.data.shapes",
        "CocoCaptionsDataModule": "captioning.data.coco",
        "FolderCaptionsDataModule": "captioning.data.folder",
        "CachedFeaturesDataModule": "captioning.data.cached",
        "TsvTextDataModule": "captioning.data.text",
        "SyntheticTextDataModule": "captioning.data.text_tasks",
    },
}

# Modules of earlier releases -> where their classes live now.
FORMER_MODULES = {
    "captioning.image_model": "captioning.models.image_captioner",
    "captioning.text_model": "captioning.models.seq2seq",
    "captioning.encoders": "captioning.nn.encoders",
    "captioning.timm_encoder": "captioning.nn.timm_encoder",
    "captioning.callbacks": "captioning.models.callbacks",
    "captioning.wandb_setup": "captioning.io.wandb_logging",
    "datamodules.shapes": "captioning.data.shapes",
    "datamodules.coco": "captioning.data.coco",
    "datamodules.folder": "captioning.data.folder",
    "datamodules.cached": "captioning.data.cached",
    "datamodules.text": "captioning.data.text",
}


def class_paths(kind: str) -> tuple[str, ...]:
    """Full class paths of the shipped classes of ``kind`` ("model", "encoder", "datamodule")."""
    return tuple(f"{module}.{name}" for name, module in SHIPPED[kind].items())


def modules(*kinds: str) -> tuple[str, ...]:
    """The modules holding the shipped classes of ``kinds`` (all kinds when none is given)."""
    wanted = kinds or tuple(SHIPPED)
    return tuple(dict.fromkeys(m for kind in wanted for m in SHIPPED[kind].values()))


def shipped_class_path(name: str) -> str | None:
    """The full class path of the shipped class ``name`` (any kind), or None."""
    for classes in SHIPPED.values():
        if name in classes:
            return f"{classes[name]}.{name}"
    return None


def current_class_path(class_path: str) -> str:
    """Where a class named by an earlier release lives now (``captioning.models.ImageCaptioner``
    and ``captioning.image_model.ImageCaptioner`` -> ``captioning.models.image_captioner.ImageCaptioner``);
    other paths unchanged."""
    module, _, name = class_path.rpartition(".")
    if module in FORMER_MODULES or module == "captioning.models":
        return shipped_class_path(name) or f"{FORMER_MODULES.get(module, module)}.{name}"
    return class_path


class _FormerNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a former module name as a stand-in module: its shipped classes by name (wherever
    they live now), anything else from the module that took its place."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in FORMER_MODULES or fullname == "datamodules":
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = ModuleType(
            spec.name,
            f"Former name of {FORMER_MODULES.get(spec.name, 'captioning.data')} (run configs of earlier releases)",
        )
        if spec.name == "datamodules":  # the former top-level package
            module.__path__ = []
            return module
        successor = FORMER_MODULES[spec.name]

        def lookup(name: str) -> object:
            path = shipped_class_path(name)
            if path is not None:
                home, _, cls = path.rpartition(".")
                return getattr(importlib.import_module(home), cls)
            return getattr(importlib.import_module(successor), name)

        setattr(module, "__getattr__", lookup)  # noqa: B010 - a module-level __getattr__ (PEP 562)
        return module

    def exec_module(self, module):
        pass


def accept_former_module_names() -> None:
    """Let ``import datamodules.shapes`` etc. (names run configs of earlier releases hold)
    resolve to the current modules. Idempotent; the command line calls it before parsing."""
    if not any(isinstance(f, _FormerNames) for f in sys.meta_path):
        sys.meta_path.append(_FormerNames())
