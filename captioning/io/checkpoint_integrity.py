"""Whether a file is a complete PyTorch checkpoint, told without deserialising it.

A crash or a full disk in the middle of a foreign writer's save leaves a truncated file under a
checkpoint's name; :func:`checkpoint_problem` tells it from a complete one cheaply (the zip
central directory, record bounds, the CRC-checked pickle record; no tensor data is read), so
a run folder's damaged checkpoints are skipped with a warning instead of crashing a load.
Only the standard library: everything that reads checkpoints may import it.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

__all__ = ["checkpoint_problem"]

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
