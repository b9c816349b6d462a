"""Write ``predict`` output as one JSON list.

Image models give a COCO results file ``[{"image_id": ..., "caption": ...}]``; text models
give ``[{"id": ..., "source": ..., "translation": ...}]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from captioning.io.outputs import free_path
from captioning.models.distributed import gather_unique


class CocoResultsWriter(pl.Callback):
    """Collects every rank's predictions and writes one COCO results JSON on rank 0.

    Args:
        path: output file; default ``<log_dir>/predictions.json``. An existing file is
            never replaced: a numbered name is used and printed.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._items: list[dict] = []
        self.written: Path | None = None

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._items = []

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._items.extend(outputs or [])

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Image models key by "image_id", text models by "id"; padding duplicates collapse.
        items = gather_unique(self._items, lambda item: item.get("image_id", item.get("id")))
        if not trainer.is_global_zero:
            return
        target = Path(self.path) if self.path else Path(trainer.log_dir or ".") / "predictions.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target = free_path(target)
        target.write_text(json.dumps(list(items.values()), indent=1))
        self.written = target
        print(f"wrote {len(items)} predictions to {target}")
