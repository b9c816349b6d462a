"""``hparams`` typed as what it is: Lightning annotates it as ``AttributeDict | MutableMapping``,
which hides ``self.hparams.lr`` from type checkers although every module and datamodule of ours
saves its hyper-parameters into an ``AttributeDict``."""

from __future__ import annotations

from typing import cast

from lightning.fabric.utilities.data import AttributeDict


class TypedHyperparameters:
    """Mixin (before the Lightning base class) for LightningModules and LightningDataModules."""

    @property
    def hparams(self) -> AttributeDict:
        return cast(AttributeDict, super().hparams)  # type: ignore[misc]
