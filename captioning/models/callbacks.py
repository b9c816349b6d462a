"""Attention overlays of a fixed set of validation items, every validation epoch.

:class:`AttentionOverlays` decodes the same few validation items at the end of every
validation run and shows where the model looked:

the model draws them through its ``attention_figures(batch, max_items, panel_size, beam_size)``
hook (:class:`captioning.models.base.AttentionModel`): image models, one picture per image (the
image, then one heatmap panel per generated word); the text model, source x target heatmaps.
Items are ``{"key", "figure", "prediction", "references", "input"}``.

With a W&B logger the pictures go to ``val/attention/<key>`` and a ``val/attention_table``
(key, input, prediction, references, per-item CIDEr-D, overlay). With any other logger, or
none, the same pictures are written as PNG files (plus ``captions.json``; ``translations.json``
for a text model) under
``<run dir>/attention/epoch<E>-step<S>/``. Only global rank 0 draws and logs; all ranks
take part in gathering the references (the CIDEr document frequencies come from the whole
validation set, as for ``val/cider``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from PIL import Image

from captioning.models.distributed import gather_objects

__all__ = ["AttentionOverlays", "per_image_cider"]


def per_image_cider(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[Hashable, float]:
    """CIDEr-D of each prediction, with document frequencies from ALL ``references``.

    Args:
        predictions: id -> generated caption, for the items to score.
        references: id -> reference captions; must cover every prediction id. Ids without a
            prediction still count as documents, so a few items are scored against the
            statistics of the whole validation set (the mean over every id equals the corpus
            CIDEr-D of :func:`captioning.eval.metrics.caption_scores` with Python tokenisation).

    Text is tokenised with :func:`captioning.data.vocab.tokenize` (no Java needed).
    """
    from pycocoevalcap.cider.cider import Cider

    from captioning.data.vocab import tokenize

    missing = [k for k in predictions if k not in references]
    if missing:
        raise ValueError(f"per_image_cider: no references for ids {missing[:5]}")
    refs = {k: [" ".join(tokenize(r)) for r in ([v] if isinstance(v, str) else v)] for k, v in references.items()}
    if not any(r.split() for rs in refs.values() for r in rs):
        return dict.fromkeys(predictions, 0.0)  # no n-grams at all: CiderScorer would fail on max([])
    res = {k: [" ".join(tokenize(predictions[k])) if k in predictions else ""] for k in refs}
    _, scores = Cider().compute_score(refs, res)
    by_id = dict(zip(refs, scores))  # Cider scores in the order of refs' keys
    return {k: float(by_id[k]) for k in predictions}


def sentinel_text(item: dict) -> str:
    """ "word beta" pairs of an item's sentinel weights (the W&B table column), or "" without one."""
    betas = item.get("sentinel")
    if betas is None:
        return ""
    return " | ".join(f"{w} {b:.2f}" for w, b in zip(str(item["prediction"]).split(), betas))


def _batch_ids(batch: dict) -> list | None:
    for name in ("image_ids", "ids"):
        if isinstance(batch.get(name), (list, tuple)):
            return list(batch[name])
    return None


def _as_list(refs: Any) -> list[str]:
    return [refs] if isinstance(refs, str) else [str(r) for r in refs]


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:100] or "item"


class AttentionOverlays(pl.Callback):
    """Log attention overlays of a fixed set of validation items (module docstring).

    Args:
        num_images: how many items, the first ones of the validation set (fixed across epochs).
        panel_size: side in pixels of each panel of an image overlay.
        beam_size: beam for the overlays; None = the model's own setting.
        key: W&B key prefix (``<key>/<item key>`` images and ``<key>_table``); also the
            folder name for PNG files.
    """

    def __init__(
        self, num_images: int = 4, panel_size: int = 128, beam_size: int | None = None, key: str = "val/attention"
    ) -> None:
        if num_images < 1:
            raise ValueError(f"AttentionOverlays: num_images must be >= 1, got {num_images}")
        if panel_size < 16:
            raise ValueError(f"AttentionOverlays: panel_size must be >= 16 pixels, got {panel_size}")
        self.num_images, self.panel_size, self.beam_size, self.key = num_images, panel_size, beam_size, key
        self._references: dict = {}
        self.last_items: list[dict] = []  # what was logged last (rank 0), for notebooks and tests
        self.last_dir: Path | None = None
        self._warned = False

    # ------------------------------------------------------------------ collecting references
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._references = {}

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        ids = _batch_ids(batch) if isinstance(batch, dict) else None
        if ids is not None and "references" in batch and dataloader_idx == 0:
            self._references.update((i, _as_list(r)) for i, r in zip(ids, batch["references"]))

    # ------------------------------------------------------------------ drawing and logging
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # Every rank must join the gather (a collective); then only rank 0 works.
        references = dict(gather_objects(list(self._references.items())))
        self._references = {}
        if not trainer.is_global_zero:
            return
        batch = self._fixed_batch(trainer)
        if batch is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            batch = trainer.strategy.batch_to_device(batch, pl_module.device)
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                items = self._figures(pl_module, batch)
        finally:
            pl_module.train(was_training)
        if not items:
            return
        keyed: dict[Any, Any] = {str(k): v for k, v in references.items()}  # item keys are strings
        for it in items:
            it["references"] = _as_list(it["references"])
            keyed.setdefault(it["key"], it["references"])
        scores = per_image_cider({it["key"]: it["prediction"] for it in items}, keyed)
        for it in items:
            it["cider"] = scores[it["key"]]
        self.last_items = items
        from lightning.pytorch.loggers import WandbLogger

        wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if wandb_logger is not None:
            self._log_wandb(wandb_logger, items, trainer.global_step)
        else:
            from captioning.models.protocols import Translator

            records = "translations.json" if isinstance(pl_module, Translator) else "captions.json"
            self.last_dir = self._write_files(trainer, items, records)

    def _fixed_batch(self, trainer: pl.Trainer) -> dict | None:
        """The first ``num_images`` validation items, collated like the validation loader does."""
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            return None  # iterable datasets: no fixed items to pick
        n = min(self.num_images, len(dataset))
        if n == 0:
            return None
        collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
        return collate([dataset[i] for i in range(n)])

    def _figures(self, pl_module: pl.LightningModule, batch: dict) -> list[dict]:
        hook = getattr(pl_module, "attention_figures", None)
        if not callable(hook):
            raise TypeError(
                f"AttentionOverlays: {type(pl_module).__name__} has no attention_figures(batch, max_items, "
                "panel_size, beam_size) hook (captioning.models.base.AttentionModel)"
            )
        items = hook(batch, self.num_images, panel_size=self.panel_size, beam_size=self.beam_size)
        if not items and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"AttentionOverlays: {type(pl_module).__name__} drew no figures for the validation batch "
                "(cached features carry no images to draw on)"
            )
        for it in items:
            it["key"] = str(it["key"])
        return items

    def _log_wandb(self, logger: Any, items: list[dict], step: int) -> None:
        import wandb

        table = wandb.Table(columns=["key", "input", "prediction", "references", "cider", "sentinel", "attention"])
        data: dict[str, Any] = {}
        for it in items:
            data[f"{self.key}/{it['key']}"] = wandb.Image(it["figure"], caption=it["prediction"])
            source = wandb.Image(it["input"]) if isinstance(it["input"], Image.Image) else str(it["input"])
            table.add_data(
                it["key"],
                source,
                it["prediction"],
                "\n".join(it["references"]),
                it["cider"],
                sentinel_text(it),
                wandb.Image(it["figure"]),
            )
        data[f"{self.key}_table"] = table
        data["trainer/global_step"] = step  # the x axis Lightning's WandbLogger defines
        logger.experiment.log(data)

    def _write_files(self, trainer: pl.Trainer, items: list[dict], records: str = "captions.json") -> Path:
        from captioning.io.outputs import free_path
        from captioning.io.run_folders import run_dir

        name = f"epoch{trainer.current_epoch:03d}-step{trainer.global_step:07d}"
        folder = free_path(run_dir(trainer) / self.key.replace("/", "_") / name)
        folder.mkdir(parents=True)
        rows = []
        for it in items:
            png = free_path(folder / f"{_safe_name(it['key'])}.png")  # two keys may share a safe name
            it["figure"].save(png)
            rows.append(
                {
                    "key": it["key"],
                    "prediction": it["prediction"],
                    "references": it["references"],
                    "cider": it["cider"],
                    "input": it["input"] if isinstance(it["input"], str) else None,
                    "sentinel": it.get("sentinel"),
                    "figure": png.name,
                }
            )
        (folder / records).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        return folder
