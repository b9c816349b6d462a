"""Checkpoint files that are either complete or absent, and a checkpoint when a run fails.

:class:`AtomicCheckpointIO` writes a checkpoint to a hidden temporary file beside the target
(``.<name>.<random>.tmp`` in the same folder, so on the same filesystem), flushes and
``fsync``\\ s it, ``os.replace``\\ s it onto the target (atomic on POSIX and Windows within one
filesystem) and ``fsync``\\ s the folder, so the rename itself survives a crash. A failure at any
point removes the temporary file and leaves the previous checkpoint at that path untouched;
an ``OSError`` (disk full, quota, permissions, read-only filesystem) becomes one
:class:`CheckpointWriteError` line that says so.

What Lightning 2.6 does instead (``TorchCheckpointIO.save_checkpoint`` ->
``lightning.fabric.utilities.cloud_io._atomic_save``): it serialises the whole checkpoint into
an in-memory ``BytesIO`` (twice the checkpoint's size in RAM), then writes it inside an fsspec
transaction. fsspec's local file opener writes the deferred file to ``tempfile.mkstemp()``,
i.e. in the *system* temp folder (``/tmp``, often another filesystem or a RAM disk), and
commits it with ``shutil.move``. When ``/tmp`` is another filesystem, ``rename`` fails with
EXDEV and ``shutil.move`` falls back to copying into the target path itself: the target is
truncated first and then written in place, so a full disk leaves a partial file under the
checkpoint's name (the observed 1.3 MB ``best*.ckpt`` of 9.3 MB) and the previous checkpoint
is gone. Nothing is ``fsync``\\ ed, so a crash shortly after a "successful" save can leave an
empty file; a ``PermissionError`` not caused by EXDEV is swallowed (the checkpoint is silently
not written); and the errors that do come through (``[Errno 28] No space left on device``)
do not name the checkpoint. Remote paths (``s3://``, ...) keep Lightning's way here.

:class:`FaultCheckpoint` does what Lightning's ``OnExceptionCheckpoint`` does, made to fit our runs: when
an exception stops ``fit`` after training started, it writes ``on_exception.ckpt`` into the
run's checkpoint folder (where ``ModelCheckpoint`` writes; :func:`captioning.io.run_folders.checkpoint_dir`)
and attaches "resume with --ckpt_path <it>" to the exception, which the CLI prints with the
error. :func:`use_atomic_checkpoint_io` and this callback are what the CLI installs by default.

Reading: :func:`checkpoint_problem` tells a complete checkpoint file from a truncated, empty or
foreign one without deserialising it (zip central directory, record bounds, the CRC-checked
pickle record), and :func:`load_checkpoint_file` loads one with ``weights_only=True`` and
errors of our own: PyTorch's advise to retry with ``weights_only=False`` is exactly the unsafe
thing to do with a file that holds pickled Python objects, so it is never repeated.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import secrets
import sys
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from captioning.errors import UserError, add_note, exception_chain
from captioning.io.checkpoint_integrity import CheckpointReadError, checkpoint_problem

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointWriteError",
    "CheckpointReadError",
    "atomic_save",
    "use_atomic_checkpoint_io",
    "FaultCheckpoint",
    "checkpoint_problem",
    "load_checkpoint_file",
]

_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_BUFFER = 1 << 20  # bytes buffered before a write system call (torch writes records in pieces)


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written; the message says why and that nothing was replaced."""


def _write(fd: int, data: Any) -> int:
    """The one low-level write of checkpoint bytes (tests replace it to simulate a full disk)."""
    return os.write(fd, data)


class _FdWriter(io.RawIOBase):
    """A raw binary file over ``fd`` that writes through :func:`_write` and keeps its OSError.

    torch's zip writer calls ``write`` from C++ and, when it fails, may raise its own
    RuntimeError instead of the OSError: ``error`` keeps the real cause.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return _write(self.fd, data)
        except OSError as err:
            self.error = self.error or err
            raise

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self.fd)
            finally:
                super().close()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows: folders are not files
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; the file itself is synced
        pass
    finally:
        os.close(fd)


def _failure(err: OSError, path: Path, existed: bool) -> CheckpointWriteError:
    kept = "nothing was written there, the previous checkpoint is intact" if existed else "nothing was written there"
    if err.errno in _SPACE_ERRNOS:
        reason = "no space left on device" if err.errno == errno.ENOSPC else "disk quota exceeded"
        resumable = [p for p in path.parent.glob("*.ckpt") if p.name.startswith(("last", "on_exception"))]
        then = "resume with --ckpt_path last" if resumable else "run again (no checkpoint to resume from yet)"
        message = f"{reason} while writing checkpoint {path}; {kept}; free space and {then}"
    else:
        message = f"cannot write checkpoint {path}: {err.strerror or err}; {kept}"
    failure = CheckpointWriteError(message)
    failure.errno = err.errno
    return failure


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that leaves either the complete new file or the old one.

    Raises:
        CheckpointWriteError: on any OSError (one line: what failed, that nothing was replaced).
    """
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _failure(err, path, existed) from err
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    raw: _FdWriter | None = None
    try:
        # 0o666 & ~umask, as a plain open() would give the final file (mkstemp gives 0o600).
        raw = _FdWriter(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
        with io.BufferedWriter(raw, buffer_size=_BUFFER) as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(raw.fd)
        os.replace(tmp, path)
    except BaseException as err:
        if raw is not None:
            raw.close()
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError:  # cannot even remove it (e.g. permissions): say so below, keep the cause
            pass
        cause = raw.error if raw is not None and raw.error is not None else err
        if isinstance(cause, OSError):
            raise _failure(cause, path, existed) from err
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's :class:`TorchCheckpointIO` with :func:`atomic_save` for local paths.

    Install with ``Trainer(plugins=[AtomicCheckpointIO()])``; the ``captioning`` CLI does it
    by default (:func:`use_atomic_checkpoint_io`). Remote (fsspec) paths use Lightning's save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        fs = get_filesystem(path)
        if storage_options is not None or "file" not in (
            fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        ):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_save(checkpoint, fs._strip_protocol(str(path)))


def use_atomic_checkpoint_io(trainer: pl.Trainer) -> bool:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless one was configured; True if set.

    Lightning's strategy creates a plain ``TorchCheckpointIO`` lazily when none was given
    (``trainer.plugins`` / ``strategy=DDPStrategy(checkpoint_io=...)``); a wrapper such as
    ``AsyncCheckpointIO()`` without a base gets ours as its base. A configured one is kept.
    """
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    if isinstance(current, _WrappingCheckpointIO) and current.checkpoint_io is None:
        current.checkpoint_io = AtomicCheckpointIO()
        return True
    return False


class FaultCheckpoint(Callback):
    """Writes ``<run checkpoint folder>/on_exception.ckpt`` when an exception stops ``fit``.

    What Lightning's ``OnExceptionCheckpoint`` does, made to fit our runs. Not a subclass of
    it on purpose: with one among the callbacks, Lightning turns ``fit`` *without*
    ``--ckpt_path`` into ``--ckpt_path last`` (``_CheckpointConnector._parse_ckpt_path``), so a
    fresh run with a fixed checkpoint ``dirpath`` would silently resume (a finished run's rerun
    would train nothing). Further differences: the folder is found when the exception
    happens (the run's ``ModelCheckpoint`` folder, else ``run_dir/checkpoints``), so the file
    lands next to ``last.ckpt`` of *this* run; nothing is written before the first training
    step (an error during set-up leaves no misleading untrained checkpoint) nor when the error
    was a failed checkpoint write (the disk is full); under DDP rank 0 writes without the
    barrier of ``Trainer.save_checkpoint`` (the other ranks may never get there; when another
    rank fails, Lightning kills rank 0 and no checkpoint is written); the file is not deleted
    at teardown; and the exception gets a note saying how to resume.

    Args:
        dirpath: fixed folder for the checkpoint; None = the run's checkpoint folder.
        filename: file name without ``.ckpt``.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "on_exception") -> None:
        if not filename:
            raise ValueError("FaultCheckpoint: filename cannot be empty")
        self.dirpath, self.filename = dirpath, filename
        self.saved_path: str | None = None

    def _path(self, trainer: pl.Trainer) -> str:
        from captioning.io.run_folders import checkpoint_dir

        folder = self.dirpath or checkpoint_dir(trainer)
        return os.path.join(folder, self.filename + ".ckpt")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        if trainer.state.fn != "fit" or trainer.global_step == 0 or trainer.model is None:
            return
        if any(isinstance(e, CheckpointWriteError) for e in exception_chain(exception)):
            return
        if any(type(e).__name__ == "NonFiniteTrainingError" for e in exception_chain(exception)):
            return  # the weights are NaN: a checkpoint of them would only be resumed into the same failure
        strategy = trainer.strategy
        rank_zero_alone = (
            isinstance(strategy, (DDPStrategy, SingleDeviceStrategy))
            and "deepspeed" not in type(strategy).__name__.lower()
        )
        if trainer.world_size > 1 and not rank_zero_alone:
            rank_zero_warn(
                f"{type(exception).__name__} stopped fit; no on-exception checkpoint with "
                f"{type(strategy).__name__} (its checkpoints need every process)"
            )
            return
        if trainer.world_size > 1 and not trainer.is_global_zero:
            return
        path = self._path(trainer)
        try:
            if trainer.world_size > 1:  # rank 0 alone: the others may be stuck in a collective or gone
                # Private API (listed in captioning/commands/lightning_adapter.py, checked by its test).
                strategy.checkpoint_io.save_checkpoint(trainer._checkpoint_connector.dump_checkpoint(False), path)
            else:
                trainer.save_checkpoint(path)
        except Exception as err:  # never hide the original error behind this one
            add_note(exception, f"the on-exception checkpoint could not be written ({type(err).__name__}: {err})")
            return
        self.saved_path = path
        note = f"checkpoint of step {trainer.global_step} saved before stopping: resume with --ckpt_path {path}"
        add_note(exception, note)
        if isinstance(exception, KeyboardInterrupt):  # Lightning exits without re-raising it
            print(note, file=sys.stderr, flush=True)


def _unsupported_global(message: str) -> str | None:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return found.group(1) if found else None


def load_checkpoint_file(path: str | os.PathLike, check: bool = True) -> Any:
    """``torch.load(path, weights_only=True, mmap=True)`` on CPU, with errors of our own.

    Raises:
        FileNotFoundError: no such file.
        CheckpointReadError: damaged/truncated file (:func:`checkpoint_problem`), or a file
            holding pickled Python objects other than tensors and plain data.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointReadError(f"checkpoint {path} is not a file")
    problem = checkpoint_problem(path) if check else None
    if problem is not None:
        raise CheckpointReadError(f"checkpoint {path} is damaged or incomplete: {problem}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        name = _unsupported_global(str(err))
        if name is not None or "WeightsUnpickler" in str(err):
            found = f" (first: {name})" if name else ""
            raise CheckpointReadError(
                f"refusing to load {path}: it contains pickled Python objects{found} (not written by this "
                "package, or tampered with); only checkpoints written by `captioning fit` load"
            ) from None
        raise CheckpointReadError(f"checkpoint {path} is damaged: {_reason(err)}") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise CheckpointReadError(f"checkpoint {path} is damaged: {_reason(err)}") from None
    from captioning.io.plain_data import PlainDataError, check_plain_data

    try:  # shared references make a small file a huge tree for whatever walks it next
        check_plain_data(loaded, f"checkpoint {path}")
    except PlainDataError as err:
        raise CheckpointReadError(str(err)) from None
    return loaded


def _reason(err: BaseException) -> str:
    """First line of ``err``; never torch's advice to load with weights_only=False."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    if not first or "weights_only" in first:
        return type(err).__name__
    return f"{type(err).__name__}: {first}"
