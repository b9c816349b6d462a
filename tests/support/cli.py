"""Helpers for tests that run the ``captioning`` CLI in subprocesses (DDP, resume).

``Probe`` is a callback the subprocess imports (``tests/`` is put on its PYTHONPATH): every
rank appends what it saw (global step, precision, logged metrics) to ``<out>/rank<R>.jsonl``,
so a test can check what each process of a DDP run logged, not only rank 0's logger.
The datamodules such runs name by class path are in :mod:`support.datamodules`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl

from support import ROOT, TESTS

# Tiny model and data: a CLI run is dominated by start-up, not training.
SMALL = [
    "--config",
    str(ROOT / "configs" / "shapes.yaml"),
    "--test_after_fit",
    "false",
    "--trainer.max_epochs",
    "1",
    "--trainer.check_val_every_n_epoch",
    "1",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--data.init_args.train_size",
    "32",
    "--data.init_args.val_size",
    "7",
    "--data.init_args.batch_size",
    "8",
    "--model.init_args.embed_dim",
    "16",
    "--model.init_args.decoder_dim",
    "32",
    "--model.init_args.attention_dim",
    "16",
    "--model.init_args.encoder.init_args.channels",
    "16",
    "--model.init_args.encoder.init_args.width",
    "4",
    "--model.init_args.beam_size",
    "2",
    "--model.init_args.max_length",
    "10",
    "--model.init_args.scheduler",
    "none",
]


class Probe(pl.Callback):
    """Append one JSON line per event and rank to ``<out>/rank<R>.jsonl``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def _write(self, trainer: pl.Trainer, event: str, **extra) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        record = {
            "event": event,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "precision": str(trainer.precision),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            **extra,
        }
        with open(self.out / f"rank{trainer.global_rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, "train_start")
        loader = trainer.train_dataloader
        batches = getattr(loader, "batch_sampler", None)
        self._write(
            trainer,
            "train_sampler",
            batch_sampler=type(batches).__name__,
            sampler=type(getattr(batches, "sampler", None)).__name__,
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self._write(trainer, "train_batch", ids=list(batch["image_ids"]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, "train_end")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, "val_end")


def probe_config(path: Path, out: Path, extra_callbacks: str = "") -> Path:
    """A config fragment appending :class:`Probe` (and ``extra_callbacks`` YAML items)."""
    path.write_text(
        "trainer:\n  callbacks+:\n"
        f"    - class_path: support.cli.Probe\n      init_args:\n        out: {out}\n" + extra_callbacks,
        encoding="utf-8",
    )
    return path


def read_probe(out: Path) -> dict[int, list[dict]]:
    """rank -> its records, in order."""
    return {
        int(p.stem[4:]): [json.loads(line) for line in p.read_text().splitlines()]
        for p in sorted(out.glob("rank*.jsonl"))
    }


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment of a CLI subprocess: W&B offline in ``tmp``, no Java (faster), tests importable."""
    # No inherited W&B settings: WANDB_SERVICE (set by any in-process wandb.init) would attach
    # the child to another process's wandb service, and a key would make it try to go online.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(tmp),
        WANDB_DATA_DIR=str(tmp / "wandb-data"),
        WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
        WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
        CAPTIONING_NO_JAVA="1",
        CAPTIONING_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "captioning", *args]


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI to completion; fail with its output if it exits non-zero."""
    proc = subprocess.run(cli_command(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"captioning {' '.join(args[:1])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc
