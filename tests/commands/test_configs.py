"""Shipped configs run, not just parse: the cached shapes route end to end, and a guard that
every config in configs/ is run by some test."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from captioning.commands.main import main

from support import ROOT, TESTS
from support.cli import cli_command, cli_env

# Trainer fragments that need hardware CI does not have; what they set is plain Lightning.
NEEDS_GPU_OR_CLUSTER = {"trainer/gpu.yaml", "trainer/fp16.yaml", "trainer/multinode.yaml"}


@pytest.mark.e2e
def test_shapes_cached_builds_the_cache_trains_from_it_and_captions_photos(tmp_path, capsys):
    config = str(ROOT / "configs" / "shapes_cached.yaml")
    tiny_data = [
        "--data.init_args.data.init_args.train_size",
        "24",
        "--data.init_args.data.init_args.val_size",
        "4",
        "--data.init_args.data.init_args.test_size",
        "4",
        "--data.init_args.cache_dir",
        str(tmp_path / "cache"),
    ]
    assert main(["cache-features", "--config", config, *tiny_data]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train: 24 images, 4x4x512 float16", out)
    built = (tmp_path / "cache" / "train" / "features.npy").stat().st_mtime_ns
    main(
        [
            "fit",
            "--config",
            config,
            *tiny_data,
            "--trainer.max_epochs",
            "1",
            "--trainer.check_val_every_n_epoch",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "run"),
            "--model.init_args.embed_dim",
            "16",
            "--model.init_args.decoder_dim",
            "32",
            "--model.init_args.attention_dim",
            "16",
            "--model.init_args.max_length",
            "8",
        ]
    )
    assert (tmp_path / "cache" / "train" / "features.npy").stat().st_mtime_ns == built  # reused, not rebuilt
    metrics = next((tmp_path / "run").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "test/cider" in metrics and "test/localisation" in metrics  # test_after_fit ran
    ckpt = sorted((tmp_path / "run").rglob("best*.ckpt"))[-1]
    index = json.loads((tmp_path / "cache" / "train" / "index.json").read_text())
    assert index["encoder"] == torch.load(ckpt, weights_only=True)["hyper_parameters"]["encoder"]

    from captioning.data.shapes import ShapesDataModule

    photo = ShapesDataModule(image_size=128).export_images("test", [2], tmp_path)[0]
    done = subprocess.run(
        cli_command("caption", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "o"), str(photo)),
        env=cli_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "o" / f"{photo.stem}.json").read_text())["grid_size"] == [4, 4]


def test_every_shipped_config_is_run_by_a_test():
    sources = "\n".join(p.read_text() for p in TESTS.rglob("*.py"))
    configs = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml"))
    untested = []
    for name in configs:
        if name in NEEDS_GPU_OR_CLUSTER:
            continue
        stem, folder = Path(name).name, Path(name).parent.name
        mentioned = (
            f'"{name}"' in sources
            or f"'{name}'" in sources
            or f'"{stem}"' in sources
            or (folder and f'"{folder}" / "{stem}"' in sources)
            or f"configs/{name}" in sources
        )
        if not mentioned:
            untested.append(name)
    assert not untested, f"configs no test runs: {untested}"


def test_text_reverse_trains_and_its_checkpoint_translates(tmp_path, capsys):
    run = tmp_path / "run"
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "text_reverse.yaml"),
            "--trainer.max_epochs",
            "1",
            "--trainer.default_root_dir",
            str(run),
            "--trainer.logger.init_args.save_dir",
            str(run),
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.train_size",
            "64",
            "--data.init_args.val_size",
            "8",
            "--data.init_args.test_size",
            "8",
            "--data.init_args.batch_size",
            "16",
        ]
    )
    assert "test/exact_match" in next(run.rglob("metrics.csv")).read_text().splitlines()[0]
    capsys.readouterr()
    assert main(["translate", "--ckpt_path", str(run), "q w e r t y"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
