"""Checkpoint files: written atomically (a full disk never leaves a partial file), run folders
skip unreadable checkpoints, loading says what is wrong in our words, and a failed ``fit``
leaves a checkpoint to resume from."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

import captioning.io.checkpoint_files as checkpoint_io
from captioning.commands.main import main
from captioning.data.shapes import ShapesDataModule
from captioning.errors import user_message
from captioning.io.checkpoint_files import (
    AtomicCheckpointIO,
    CheckpointReadError,
    CheckpointWriteError,
    checkpoint_problem,
    use_atomic_checkpoint_io,
)
from captioning.io.model_loading import find_checkpoint, read_checkpoint

from support import ROOT

ENOSPC_LINE = (
    "no space left on device while writing checkpoint {path}; nothing was written there, the previous "
    "checkpoint is intact; free space and run again (no checkpoint to resume from yet)"
)


def _checkpoint(size: int = 1000, step: int = 0) -> dict:
    return {
        "state_dict": {"w": torch.arange(size, dtype=torch.float32)},
        "hyper_parameters": {"vocab": ["a"]},
        "global_step": step,
    }


def _save(path: Path, mtime: float | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_checkpoint(**kwargs), path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _full_disk_after(monkeypatch, limit: int) -> list[int]:
    """Make checkpoint writes fail with ENOSPC once ``limit`` bytes went to the file."""
    written = [0]

    def write(fd: int, data) -> int:
        room = limit - written[0]
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, bytes(memoryview(data)[:room]))
        written[0] += n
        return n

    monkeypatch.setattr(checkpoint_io, "_write", write)
    return written


# --- writing ---------------------------------------------------------------------------------


def test_enospc_mid_write_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "best-epoch03.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(size=1000, step=3), target)
    before = target.read_bytes()
    written = _full_disk_after(monkeypatch, limit=100_000)  # the new checkpoint is ~800 KB
    with pytest.raises(CheckpointWriteError) as caught:
        AtomicCheckpointIO().save_checkpoint(_checkpoint(size=200_000, step=4), target)
    assert written[0] == 100_000, "the write must fail part-way, not before it started"
    assert str(caught.value) == ENOSPC_LINE.format(path=target)
    assert caught.value.errno == errno.ENOSPC
    assert target.read_bytes() == before, "the previous checkpoint was modified"
    assert [p.name for p in target.parent.iterdir()] == [target.name], "a temporary file was left behind"
    assert torch.load(target, weights_only=True)["global_step"] == 3
    # The CLI prints it as one line (it is a user error: free space, resume).
    assert user_message(caught.value) == ENOSPC_LINE.format(path=target)


def test_the_disk_full_line_says_resume_only_when_there_is_a_checkpoint_to_resume_from(tmp_path, monkeypatch):
    _save(tmp_path / "last.ckpt", step=3)
    _full_disk_after(monkeypatch, limit=5000)
    with pytest.raises(CheckpointWriteError, match=r"free space and resume with --ckpt_path last$"):
        AtomicCheckpointIO().save_checkpoint(_checkpoint(size=100_000), tmp_path / "best-epoch04.ckpt")
    _full_disk_after(monkeypatch, limit=5000)
    (tmp_path / "last.ckpt").unlink()
    with pytest.raises(CheckpointWriteError, match=r"free space and run again \(no checkpoint to resume from yet\)$"):
        AtomicCheckpointIO().save_checkpoint(_checkpoint(size=100_000), tmp_path / "best-epoch04.ckpt")


def test_enospc_without_previous_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    _full_disk_after(monkeypatch, limit=5000)
    with pytest.raises(
        CheckpointWriteError,
        match=r"^no space left on device while writing checkpoint .*last.ckpt; "
        r"nothing was written there; free space",
    ):
        AtomicCheckpointIO().save_checkpoint(_checkpoint(size=100_000), target)
    assert list(tmp_path.iterdir()) == []


def test_enospc_at_fsync_is_reported_the_same_way(tmp_path, monkeypatch):
    target = _save(tmp_path / "last.ckpt", step=1)
    before = target.read_bytes()

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_io.os, "fsync", fsync)
    with pytest.raises(CheckpointWriteError, match="no space left on device"):
        AtomicCheckpointIO().save_checkpoint(_checkpoint(step=2), target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_atomic_save_replaces_target_with_complete_file_and_default_permissions(tmp_path):
    target = _save(tmp_path / "last.ckpt", step=1)
    AtomicCheckpointIO().save_checkpoint(_checkpoint(size=5000, step=2), target)
    assert torch.load(target, weights_only=True)["global_step"] == 2
    assert checkpoint_problem(target) is None
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # like a plain open(), not mkstemp's 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_cli_trainer_gets_atomic_checkpoint_io_but_keeps_a_configured_one():
    plain = Trainer(logger=False, enable_checkpointing=False)
    assert use_atomic_checkpoint_io(plain) and isinstance(plain.strategy.checkpoint_io, AtomicCheckpointIO)
    ddp = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False)
    assert use_atomic_checkpoint_io(ddp) and isinstance(ddp.strategy.checkpoint_io, AtomicCheckpointIO)

    class Mine(TorchCheckpointIO):
        pass

    mine = Trainer(plugins=[Mine()], logger=False, enable_checkpointing=False)
    assert not use_atomic_checkpoint_io(mine) and type(mine.strategy.checkpoint_io) is Mine
    wrapped = Trainer(plugins=[AsyncCheckpointIO()], logger=False, enable_checkpointing=False)
    assert use_atomic_checkpoint_io(wrapped)
    assert isinstance(wrapped.strategy.checkpoint_io.checkpoint_io, AtomicCheckpointIO)


TINY = [
    "--config",
    str(ROOT / "configs" / "shapes.yaml"),
    "--test_after_fit",
    "false",
    "--data.init_args.train_size",
    "32",
    "--data.init_args.val_size",
    "4",
    "--data.init_args.batch_size",
    "8",
    "--trainer.max_epochs",
    "1",
    "--trainer.check_val_every_n_epoch",
    "1",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.log_every_n_steps",
    "1",
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
    "1",
    "--model.init_args.max_length",
    "8",
    "--model.init_args.scheduler",
    "none",
    "--trainer.callbacks.init_args.num_images",
    "1",
]


def _tiny(root: Path) -> list[str]:
    return [*TINY, "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]


def test_cli_fit_writes_its_checkpoints_through_atomic_checkpoint_io(tmp_path, monkeypatch):
    saved: list[str] = []
    original = checkpoint_io.atomic_save

    def recording(obj, path):
        saved.append(Path(path).name)
        original(obj, path)

    monkeypatch.setattr(checkpoint_io, "atomic_save", recording)
    monkeypatch.setenv("CAPTIONING_NO_JAVA", "1")
    assert main(["fit", *_tiny(tmp_path)]) == 0
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    on_disk = sorted(p.name for p in folder.iterdir())
    assert "last.ckpt" in on_disk and any(n.startswith("best-") for n in on_disk), on_disk
    assert set(on_disk) <= set(saved), f"written without AtomicCheckpointIO: {set(on_disk) - set(saved)}"
    assert not any(n.startswith(".") for n in on_disk), "temporary files left behind"


# --- reading ---------------------------------------------------------------------------------


def _truncated(path: Path, source: Path, mtime: float) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 7])  # as the observed 1.3 MB of 9.3 MB
    os.utime(path, (mtime, mtime))
    return path


def test_run_folder_skips_unreadable_checkpoints_with_a_warning_and_takes_newest_valid_best(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    good = _save(folder / "best-epoch01.ckpt", mtime=1000, size=50_000)
    truncated = _truncated(folder / "best-epoch02.ckpt", good, mtime=2000)
    empty = folder / "best-epoch03.ckpt"
    empty.write_bytes(b"")
    os.utime(empty, (3000, 3000))
    _save(folder / "last.ckpt", mtime=4000)  # a valid best wins over a newer last
    with pytest.warns(UserWarning) as warned:
        assert find_checkpoint(tmp_path / "run") == good
    messages = [str(w.message) for w in warned]
    assert any(str(truncated) in m and "truncated" in m for m in messages), messages
    assert any(str(empty) in m and "empty" in m for m in messages), messages


def test_run_folder_without_valid_best_takes_newest_valid_last(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder).mkdir()
    (folder / "best-epoch00.ckpt").write_bytes(b"not a checkpoint at all")
    last = _save(folder / "last.ckpt", mtime=1000)
    _truncated(folder / "last-v1.ckpt", last, mtime=2000)
    with pytest.warns(UserWarning) as warned:
        assert find_checkpoint(tmp_path) == last
    skipped = sorted(Path(str(w.message).split(": ")[0].split()[-1]).name for w in warned)
    assert skipped == ["best-epoch00.ckpt", "last-v1.ckpt"]


def test_run_folder_without_any_valid_checkpoint_lists_what_it_found(tmp_path):
    (tmp_path / "best.ckpt").write_bytes(b"")
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.warns(UserWarning), pytest.raises(CheckpointReadError) as caught:
        find_checkpoint(tmp_path)
    message = str(caught.value)
    assert "no readable checkpoint" in message and "best.ckpt (empty" in message and "last.ckpt (truncated" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no best"):
        find_checkpoint(tmp_path / "empty")


def test_read_checkpoint_errors_name_the_problem_and_never_suggest_weights_only_false(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointReadError, match="is not a file"):
        read_checkpoint(tmp_path)
    good = _save(tmp_path / "good.ckpt", size=20_000)
    assert read_checkpoint(good)["global_step"] == 0
    with pytest.raises(CheckpointReadError, match=r"damaged or incomplete: truncated"):
        read_checkpoint(_truncated(tmp_path / "cut.ckpt", good, mtime=time.time()))

    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"where": Path("/etc")}}, pickled)
    with pytest.raises(CheckpointReadError) as caught:
        read_checkpoint(pickled)
    message = str(caught.value)
    assert message.startswith(f"refusing to load {pickled}: it contains pickled Python objects")
    assert message.endswith(
        "(not written by this package, or tampered with); only checkpoints written by `captioning fit` load"
    )
    assert "weights_only" not in message and "\n" not in message

    foreign = tmp_path / "weights.pt"
    torch.save({"layer.weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointReadError, match="is a PyTorch file but not a checkpoint of this package"):
        read_checkpoint(foreign)
    for err in (caught.value,):
        assert user_message(err) == message


def test_cli_ckpt_path_to_damaged_file_is_one_line(tmp_path, capsys):
    good = _save(tmp_path / "good.ckpt", size=20_000)
    cut = _truncated(tmp_path / "cut.ckpt", good, mtime=time.time())
    assert main(["validate", *_tiny(tmp_path), "--ckpt_path", str(cut)]) == 2
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert f"checkpoint {cut} is damaged or incomplete: truncated" in line and "Traceback" not in err


# --- on-exception checkpoint -----------------------------------------------------------------


def test_failed_fit_writes_checkpoint_and_error_says_file_and_how_to_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAPTIONING_NO_JAVA", "1")
    images = tmp_path / "images"
    data = [
        "--data",
        "support.datamodules.BadImageShapes",
        "--data.init_args.train_size",
        "32",
        "--data.init_args.val_size",
        "4",
        "--data.init_args.batch_size",
        "8",
        "--data.init_args.num_workers",
        "1",
        "--data.init_args.image_dir",
        str(images),
    ]
    # Item 20 is in the third batch (items 16-23): two optimizer steps are done when it fails.
    assert main(["fit", *_tiny(tmp_path), *data, "--data.init_args.bad_item", "20"]) == 2
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    saved = folder / "on_exception.ckpt"
    assert line.startswith(f"error: {images}/train_") and "not a readable image" in line, line
    assert line.endswith(f"checkpoint of step 2 saved before stopping: resume with --ckpt_path {saved}"), line
    state = read_checkpoint(saved)
    assert state["global_step"] == 2 and state["hyper_parameters"]["vocab"] == ShapesDataModule().vocab.to_dict()

    # Resume from it once the image is fixed: training continues at step 2 and finishes the epoch.
    assert main(["fit", *_tiny(tmp_path), *data, "--ckpt_path", str(saved)]) == 0
    last = read_checkpoint(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and last["epoch"] == 0


def test_error_before_training_writes_no_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAPTIONING_NO_JAVA", "1")
    data = [
        "--data",
        "support.datamodules.BadImageShapes",
        "--data.init_args.train_size",
        "16",
        "--data.init_args.val_size",
        "4",
        "--data.init_args.batch_size",
        "8",
        "--data.init_args.bad_item",
        "0",
    ]
    assert main(["fit", *_tiny(tmp_path), *data]) == 2
    line = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")][0]
    assert "not a readable image" in line and "--ckpt_path" not in line
    assert not list(tmp_path.rglob("*.ckpt"))


# --- packaging -------------------------------------------------------------------------------


def test_dependencies_exclude_malicious_lightning_releases_and_stop_before_next_major():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    requirements = [
        r for r in map(Requirement, project["dependencies"] + extras) if r.name != project["name"]
    ]  # the dev extra pulls in our own extras
    [lightning] = [r for r in requirements if r.name == "lightning"]
    assert not lightning.specifier.contains("2.6.2") and not lightning.specifier.contains("2.6.3")
    assert lightning.specifier.contains("2.6.6") and not lightning.specifier.contains("3.0.0")
    for requirement in requirements:
        pinned = any(spec.operator == "==" for spec in requirement.specifier)
        capped = any(spec.operator == "<" for spec in requirement.specifier)
        assert pinned or capped, f"{requirement} has no upper bound"
