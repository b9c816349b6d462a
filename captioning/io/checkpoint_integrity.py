"""Whether a file is a complete PyTorch checkpoint, told without deserialising it.

A crash or a full disk in the middle of a foreign writer's save leaves a truncated file under a
checkpoint's name; :func:`checkpoint_problem` tells it from a complete one cheaply (the zip
central directory, record bounds, the CRC-checked pickle record; no tensor data is read), so
a run folder's damaged checkpoints are skipped with a warning instead of crashing a load
(:func:`find_checkpoint`, which picks a run folder's checkpoint).
Only the standard library: everything that reads checkpoints may import it.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from captioning.errors import UserError

__all__ = ["checkpoint_problem", "find_checkpoint", "CheckpointReadError"]


class CheckpointReadError(UserError, ValueError):
    """A checkpoint file is damaged, foreign, or holds pickled Python objects; the message says which."""


_ZIP_MAGIC = b"PK\x03\x04"


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete PyTorch checkpoint file, or None; cheap for any size.

    Reads the zip central directory (at the end of the file: a truncated file has none),
    checks every record lies inside the file, and reads the pickle record (``*/data.pkl``,
    CRC-checked, small); tensor data is not read.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        return f"cannot read it ({err.strerror or err})"
    if size == 0:
        return "empty file (0 bytes)"
    if head != _ZIP_MAGIC:
        return f"not a PyTorch checkpoint (no zip archive, {size} bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            pickles = [r for r in records if r.filename == "data.pkl" or r.filename.endswith("/data.pkl")]
            if not pickles:
                return "a zip archive without PyTorch's data.pkl record"
            end = max(r.header_offset + 30 + len(r.filename.encode()) + r.compress_size for r in records)
            if end > size:
                return f"truncated ({size} bytes, its records need at least {end})"
            archive.read(pickles[0])
    except zipfile.BadZipFile as err:
        return f"truncated or damaged ({size} bytes; {err})"
    except (OSError, EOFError, ValueError, NotImplementedError) as err:
        return f"damaged ({type(err).__name__}: {err})"
    return None


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file as given, or for a run folder the checkpoint to use from it.

    In a folder: the newest *readable* ``best*.ckpt`` under it, else the newest readable
    ``last*.ckpt``. Unreadable ones (truncated, empty, not a PyTorch file; see
    :func:`captioning.io.checkpoint_files.checkpoint_problem`) are skipped with a warning naming
    each; if none is readable, a :class:`CheckpointReadError` lists what was found.
    """
    import warnings

    path = Path(path)
    if not path.is_dir():
        return path
    rejected: list[str] = []
    for pattern in ("best*.ckpt", "last*.ckpt"):
        found = [p for p in path.rglob(pattern) if p.is_file()]
        for candidate in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
            problem = checkpoint_problem(candidate)
            if problem is None:
                return candidate
            warnings.warn(f"skipping unreadable checkpoint {candidate}: {problem}", stacklevel=2)
            rejected.append(f"{candidate.relative_to(path)} ({problem})")
    if not rejected:
        raise FileNotFoundError(f"no best*.ckpt or last*.ckpt under {path}")
    raise CheckpointReadError(f"no readable checkpoint under {path}; found: {'; '.join(rejected)}")
