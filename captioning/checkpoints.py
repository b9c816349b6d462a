"""Load a trained model from a Lightning checkpoint with ``weights_only=True``.

Everything needed (vocabulary, model sizes, encoder config) is plain data in the
checkpoint's ``hyper_parameters``. The encoder is rebuilt without pretrained weights
(``weights=None``): the checkpoint's state dict holds the trained ones, so captioning
works offline even when the ImageNet weights file is not on this machine.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

# Only classes from our own packages may be named by a checkpoint (no arbitrary imports).
_TRUSTED_PREFIXES = ("captioning.", "datamodules.")


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder: then the newest ``best*.ckpt`` under it (else ``last.ckpt``)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("best*.ckpt"), key=lambda p: p.stat().st_mtime) or \
            sorted(path.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"no best*.ckpt or last.ckpt under {path}")
        return found[-1]
    return path


def read_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True and an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, not a checkpoint, pickled objects
        raise ValueError(f"cannot load checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint of this package (no state_dict/hyper_parameters)")
    return ckpt


def _import_class(class_path: str) -> type:
    if not class_path.startswith(_TRUSTED_PREFIXES):
        raise ValueError(f"refusing to import {class_path!r} named by a checkpoint: only captioning.* and "
                         "datamodules.* classes are trusted")
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def build_module(config: dict, **overrides: Any) -> Any:
    """{"class_path", "init_args"} -> instance, with init args overridden where accepted."""
    cls = _import_class(config["class_path"])
    init_args = dict(config.get("init_args", {}))
    accepted = inspect.signature(cls).parameters
    init_args.update({k: v for k, v in overrides.items() if k in accepted})
    return cls(**init_args)


def load_model(path: str | Path, default_class: str = "captioning.models.ImageCaptioner",
               map_location: str | torch.device = "cpu") -> pl.LightningModule:
    """Rebuild the LightningModule saved in ``path`` (file or run folder) and load its weights (eval mode)."""
    path = find_checkpoint(path)
    ckpt = read_checkpoint(path)
    hparams = dict(ckpt["hyper_parameters"])
    class_path = hparams.pop("_class_path", None) or default_class
    hparams.pop("_instantiator", None)
    cls = _import_class(class_path)
    accepted = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    for key, value in list(kwargs.items()):
        if isinstance(value, dict) and "class_path" in value:  # a nested module (the image encoder)
            kwargs[key] = build_module(value, weights=None, weights_path=None)
    model = cls(**kwargs)
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match {cls.__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.to(map_location).eval()
