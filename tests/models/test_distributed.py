"""Multi-process (DDP) behaviour, on CPU with two processes (gloo), W&B offline.

One 2-process ``fit`` (configs/trainer/ddp.yaml + wandb.yaml) is shared by the tests: it must
leave the overlays and their table in the offline W&B run, one set of checkpoints and one
config. Validation scores of the same checkpoint must not depend on the number of processes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.models.distributed import gather_objects
from captioning.viz import attention_overlay

from support.cli import ROOT, SMALL, cli_env, probe_config, read_probe, run_cli

pytestmark = pytest.mark.e2e  # end to end: CLI subprocesses (run with -m e2e)

DDP_CPU = [
    "--config",
    str(ROOT / "configs" / "trainer" / "ddp.yaml"),
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "2",
]
PANEL = 128  # configs/shapes.yaml: AttentionOverlays panel_size
NUM_OVERLAYS = 4  # configs/shapes.yaml: AttentionOverlays num_images
TRAIN_SIZE = 32  # tests/support/cli.py SMALL
VAL_SIZE = 7  # odd: the distributed sampler pads rank 1 with a repeated image


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ddp")
    probe = tmp / "probe"
    config = probe_config(tmp / "probe.yaml", probe)
    # Two epochs (validated once, at the end) to see the training shards reshuffled.
    args = [
        "fit",
        *SMALL,
        *DDP_CPU,
        "--config",
        str(ROOT / "configs" / "trainer" / "wandb.yaml"),
        "--config",
        str(config),
        "--trainer.default_root_dir",
        str(tmp / "root"),
        "--data",
        "support.datamodules.BucketedShapes",
        "--trainer.max_epochs",
        "2",
        "--trainer.check_val_every_n_epoch",
        "2",
    ]
    run_cli(args, cli_env(tmp, WANDB_PROJECT="ddp-test"), cwd=tmp)
    return {"tmp": tmp, "probe": read_probe(probe)}


def test_ddp_fit_logs_overlays_and_table_to_offline_wandb_run(ddp_run):
    runs = list((ddp_run["tmp"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one W&B run (rank 0 only), found {runs}"
    files = runs[0] / "files"
    tables = list((files / "media" / "table" / "val").glob("attention_table_*.table.json"))
    assert len(tables) == 1, "one validation epoch -> one table"
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["key", "input", "prediction", "references", "cider", "sentinel", "attention"]
    assert [row[0] for row in table["data"]] == [str(i) for i in range(NUM_OVERLAYS)]
    images = {p.name.split("_")[0]: p for p in (files / "media" / "images" / "val" / "attention").glob("*.png")}
    assert sorted(images) == [str(i) for i in range(NUM_OVERLAYS)]
    for key, _, prediction, references, cider, sentinel, _ in table["data"]:
        assert sentinel == ""  # the shapes config has no visual sentinel
        assert len(references.split("\n")) == 5 and math.isfinite(cider) and cider >= 0
        words = prediction.split()
        # The overlay's size is fixed by its number of panels (image + one per word) and labels.
        expected = attention_overlay(
            np.zeros((64, 64, 3), np.uint8), words, np.zeros((len(words), 8, 8)), title=f"image {key}", panel_size=PANEL
        ).size
        overlay = Image.open(images[key])
        assert overlay.size == expected, f"image {key}: {overlay.size} != {expected} for {len(words)} words"
        pixels = np.asarray(overlay.convert("RGB"), dtype=np.float32)
        assert pixels.std() > 10, f"overlay of image {key} is (nearly) constant"


def test_ddp_fit_writes_checkpoints_and_config_once_and_pushes_config(ddp_run):
    tmp = ddp_run["tmp"]
    run_dirs = list((tmp / "ddp-test").iterdir())  # <WANDB_DIR>/<WANDB_PROJECT>/<run id>
    assert len(run_dirs) == 1
    ckpts = sorted(p.name for p in (run_dirs[0] / "checkpoints").iterdir())
    assert len(ckpts) == 2 and "last.ckpt" in ckpts and ckpts[0].startswith("best-"), ckpts
    assert [p.name for p in run_dirs[0].glob("config*.yaml")] == ["config.yaml"]
    wandb_run = next((tmp / "wandb").glob("offline-run-*"))
    assert wandb_run.name.endswith(run_dirs[0].name), "checkpoint folder is named by the W&B run id"
    assert (wandb_run / "files" / "config.yaml").exists(), "config file not pushed to the W&B run"
    # The CLI config went into the W&B run config (stored in the offline run's record file).
    assert b"max_epochs" in next(wandb_run.glob("run-*.wandb")).read_bytes()


def test_ddp_ranks_log_identical_corpus_metrics_over_all_images(ddp_run):
    probe = ddp_run["probe"]
    assert sorted(probe) == [0, 1]
    ends = [next(r for r in probe[rank] if r["event"] == "val_end") for rank in (0, 1)]
    assert all(e["world_size"] == 2 for e in ends)
    for key in ("val/bleu4", "val/cider", "val/rougeL", "val/num_images"):
        assert ends[0]["metrics"][key] == ends[1]["metrics"][key], key
    assert ends[0]["metrics"]["val/num_images"] == VAL_SIZE  # no padding duplicate, none missing


def test_length_buckets_are_sharded_across_ranks_and_reshuffled_every_epoch(ddp_run):
    probe = ddp_run["probe"]
    for rank in (0, 1):
        [sampler] = [r for r in probe[rank] if r["event"] == "train_sampler"]
        assert (sampler["batch_sampler"], sampler["sampler"]) == ("LengthBucketBatchSampler", "DistributedSampler")
    seen = {
        (rank, epoch): [i for r in probe[rank] if r["event"] == "train_batch" and r["epoch"] == epoch for i in r["ids"]]
        for rank in (0, 1)
        for epoch in (0, 1)
    }
    for epoch in (0, 1):
        shard0, shard1 = seen[0, epoch], seen[1, epoch]
        assert len(shard0) == len(shard1) == TRAIN_SIZE // 2
        assert sorted(shard0 + shard1) == list(range(TRAIN_SIZE)), "each image once per epoch, over both ranks"
    assert seen[0, 0] != seen[0, 1] and set(seen[0, 0]) != set(seen[0, 1]), "shards must be reshuffled per epoch"


def _varied_checkpoint(src: Path, dst: Path) -> Path:
    """The DDP run's checkpoint with a sharper output layer: captions then differ per image,
    so equal scores mean equal captions on the same images, not all-identical captions."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["state_dict"]["decoder.output.weight"] *= 40
    torch.save(ckpt, dst)
    return dst


def _validate(tmp: Path, ckpt: Path, devices: int, name: str) -> dict:
    out = tmp / name
    args = [
        "validate",
        *SMALL,
        *DDP_CPU,
        "--trainer.devices",
        str(devices),
        "--ckpt_path",
        str(ckpt),
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--config",
        str(probe_config(tmp / f"{name}.yaml", out / "probe")),
    ]
    run_cli(args, cli_env(tmp), cwd=tmp)
    probe = read_probe(out / "probe")
    assert sorted(probe) == list(range(devices))
    return {rank: records[-1]["metrics"] for rank, records in probe.items()}


def test_validate_scores_equal_on_one_and_two_processes(ddp_run):
    tmp = ddp_run["tmp"]
    last = next((tmp / "ddp-test").glob("*/checkpoints/last.ckpt"))
    ckpt = _varied_checkpoint(last, tmp / "varied.ckpt")
    one = _validate(tmp, ckpt, 1, "one")[0]
    two = _validate(tmp, ckpt, 2, "two")
    assert one["val/num_images"] == two[0]["val/num_images"] == VAL_SIZE
    assert one["val/bleu1"] > 0, "degenerate captions: the comparison would prove little"
    for rank in (0, 1):
        assert two[rank]["val/bleu4"] == one["val/bleu4"]
        assert two[rank]["val/cider"] == one["val/cider"]


def test_gather_objects_is_identity_on_one_process():
    assert gather_objects([1, {"a": 2}]) == [1, {"a": 2}]


def test_self_critical_training_runs_on_two_processes_in_bf16(ddp_run):
    """configs/scst.yaml from the DDP run's checkpoint, two processes, bf16 autocast on CPU: each
    rank samples, scores and back-propagates its own shard; rewards are logged once."""
    tmp = ddp_run["tmp"]
    run = tmp / "scst"
    args = [
        "fit",
        *SMALL,
        *DDP_CPU,
        "--config",
        str(ROOT / "configs" / "scst.yaml"),
        "--test_after_fit",
        "false",
        "--model.init_args.init_from",
        str(tmp / "ddp-test"),  # the W&B-named run folder of the DDP run: its best checkpoint
        "--model.init_args.scst_samples",
        "3",
        "--trainer.precision",
        "bf16-mixed",
        "--trainer.default_root_dir",
        str(run),
    ]
    run_cli(args, cli_env(tmp), cwd=tmp)
    metrics = next(run.rglob("metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    assert "train/reward" in header and "train/baseline" in header and "val/cider" in header
    reward = header.index("train/reward")
    values = [float(r.split(",")[reward]) for r in metrics[1:] if r.split(",")[reward]]
    assert values and all(math.isfinite(v) and v >= 0 for v in values)
    assert len(list(run.rglob("best*.ckpt"))) == 1
