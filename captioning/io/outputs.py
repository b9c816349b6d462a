"""Where outputs go: never over a user's file, and never after the work when the folder is unusable.

One naming scheme for everything the package writes next to files that may already exist
(run configs, overlay PNG/JSON pairs, heatmaps, prediction files): the name as asked if it is
free, else ``<stem>-1``, ``<stem>-2``, ... Nothing is ever overwritten unless the user says so.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

__all__ = [
    "free_path",
    "claim_output_pair",
    "check_writable",
    "write_result_pair",
    "terminal_text",
    "safe_stem",
    "json_line",
]

# C0 and C1 control characters and DEL: a terminal acts on them (ESC [ ... moves the cursor,
# rewrites the title, ...), so a file name holding them must never be printed raw.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def terminal_text(text: str) -> str:
    r"""``text`` safe to print on one terminal line: backslash, tab, CR and LF as ``\\``, ``\t``,
    ``\r``, ``\n``; every other control character (ESC, BEL, DEL, the C1 range) as ``\xNN``."""
    text = text.replace("\\", "\\\\")
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def json_line(record: Any) -> str:
    """One JSON object on one line that is valid JSON (non-finite numbers become null) and safe
    on a terminal (DEL and the C1 controls escaped too; ``json`` escapes only C0)."""
    text = json.dumps(_finite(record), ensure_ascii=False, allow_nan=False)
    return re.sub("[\x7f-\x9f]", lambda m: f"\\u{ord(m.group()):04x}", text)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def safe_stem(path: str | os.PathLike) -> str:
    """The output-file stem for an input ``path``: its stem, or ``image`` when that is made of
    dots only (``..png``, ``...png``), which would give hidden or special names."""
    stem = Path(path).stem
    return stem if stem.strip(".") else "image"


def free_path(path: str | os.PathLike) -> Path:
    """``path`` if nothing exists there, else ``<stem>-1<suffix>``, ``-2``, ... (never overwrite)."""
    path = Path(path)
    k = 0
    candidate = path
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
    return candidate


# The process's umask: files renamed into place get the permissions a plain open() would give.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def current_umask() -> int:
    """The process's umask (read once at import; reading it means setting it, not thread-safe later)."""
    return _UMASK


# Output files written by this process -> the image they describe. With overwrite=True a
# file is only replaced when it came from the same image, so two inputs sharing a stem
# (a/cat.jpg, b/cat.jpg) in one run never overwrite each other.
_WRITTEN: dict[Path, str] = {}
_WRITTEN_LOCK = threading.Lock()


def claim_output_pair(
    output_dir: Path, stem: str, source: str, overwrite: bool, remember: bool = True
) -> tuple[Path, Path]:
    """Free ``<stem>.png``/``<stem>.json`` names in ``output_dir`` for ``source``: existing files
    (and files this process wrote for another source) are kept, ``<stem>-1``, ``-2``, ... are
    tried instead; the JSON is created exclusively so concurrent writers never collide.
    ``remember=False``: do not record the names for later calls (a server writing each request
    into its own fresh folder would otherwise grow the record forever)."""
    with _WRITTEN_LOCK:
        for k in range(10_000):
            name = stem if k == 0 else f"{stem}-{k}"
            png, js = output_dir / f"{name}.png", output_dir / f"{name}.json"
            owners = {_WRITTEN.get(png.resolve()), _WRITTEN.get(js.resolve())} - {None}
            if owners - {source}:
                continue  # written earlier in this process for another image
            if not overwrite:
                if png.exists() or js.exists():
                    continue
                try:  # exclusive create: another process writing into the same folder loses
                    js.open("x").close()
                except FileExistsError:
                    continue
            if remember:
                _WRITTEN[png.resolve()] = _WRITTEN[js.resolve()] = source
            return png, js
    raise FileExistsError(f"{output_dir}: no free file name for {stem!r} (tried {stem}-1 .. -9999)")


def write_result_pair(
    output_dir: str | os.PathLike,
    stem: str,
    source: str,
    picture: Any,
    record: dict,
    overwrite: bool = False,
    remember: bool = True,
) -> tuple[Path, Path]:
    """Write one result as ``<stem>.png`` (``picture``, a PIL image) and ``<stem>.json`` (``record``)
    into ``output_dir`` (created if missing), under free names (:func:`claim_output_pair`; with
    ``overwrite`` an earlier result of the same ``source`` is replaced).

    Both files are first written to temporary files beside their names, then renamed over them:
    a failed write (a full disk) changes nothing (an earlier pair stays whole, no partial file is
    left), and a name that is a symbolic link is replaced, never written through. Returns the
    (png, json) paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    png, js = claim_output_pair(output_dir, stem, source, overwrite, remember)
    temps: list[str] = []
    try:
        for target, write in (
            (png, lambda f: picture.save(f, format="PNG")),
            (js, lambda f: f.write((json.dumps(record) + "\n").encode("utf-8"))),
        ):
            fd, tmp = tempfile.mkstemp(dir=output_dir, prefix=f".{target.name}.", suffix=".tmp")
            temps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private
    except BaseException:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        if not overwrite:
            js.unlink(missing_ok=True)  # the empty file that held the name for this result
        raise
    os.replace(temps[0], png)  # renames: atomic, and never through a symbolic link
    os.replace(temps[1], js)
    return png, js


def check_writable(folder: str | os.PathLike, option: str = "--output") -> Path:
    """Create ``folder`` and prove a file can be written there, before any work is done.

    Raises PermissionError naming ``option`` and the folder (read-only file system, a file in
    the way, no permission)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".captioning-write-test-"):
            pass
    except OSError as err:
        raise PermissionError(f"cannot write into the {option} folder {folder}: {err.strerror or err}") from err
    return folder
