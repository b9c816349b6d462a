"""User errors: one clear line instead of a traceback.

Every ``captioning`` command runs inside :func:`captioning.commands.main.main`, which prints
``error: <one line>`` to stderr and exits with status 2 when the exception that stopped the
command is a *user error*, something the user can fix (a wrong path, a malformed data file, a
bad option value, a full disk). Anything else is a bug and keeps its traceback (exit 1).
``--debug`` anywhere on the command line, or ``CAPTIONING_DEBUG=1``, shows the traceback of
everything.

A user error is

* a :class:`UserError` (raise it, with a message that names the file or option and says what
  to do, from any command), or
* a ``ValueError``, ``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError`` or
  ``NotADirectoryError`` (``ImageReadError``, ``TsvFormatError`` are ValueErrors) whose class
  is defined in, or that was raised by, code of this project (``captioning``;
  directly or through the standard library, e.g. ``Path.read_text``), also in a DataLoader
  worker process, or
* Lightning's ``MisconfigurationException`` (an invalid Trainer setting),

possibly wrapped by jsonargparse or Lightning: jsonargparse turns an exception raised while
computing a linked argument into ``ValueError("Call to compute_fn of link ... failed: ...")``
(``from`` the original) and parser errors into ``ArgumentError``; these wrappers are looked
through (:func:`find_user_error`), and the message printed is the user error's own.
The same ValueError raised inside torch or another library is treated as a bug.

Notes attached to the exception (``add_note``; e.g. where the on-exception checkpoint was
written and how to resume) are appended to the line.
"""

from __future__ import annotations

import contextvars
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "UserError",
    "USER_ERROR_TYPES",
    "add_note",
    "exception_chain",
    "find_user_error",
    "user_message",
    "print_user_error",
    "split_debug",
    "debug_mode",
    "DEBUG",
]


class UserError(Exception):
    """A problem the user can fix; ``captioning`` prints ``error: <message>`` and exits with 2.

    The message should be one line naming the file/option at fault and what to do about it.
    """


USER_ERROR_TYPES: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
OUR_PACKAGES = ("captioning",)
# Packages whose exceptions may wrap one of ours (looked through by find_user_error).
_WRAPPING_PACKAGES = ("jsonargparse", "lightning")

# True while a command runs with --debug / CAPTIONING_DEBUG=1 (read by the CLI's parser).
DEBUG: contextvars.ContextVar[bool] = contextvars.ContextVar("captioning_debug", default=False)


def debug_mode() -> bool:
    """Whether full tracebacks were asked for (``--debug`` or ``CAPTIONING_DEBUG=1``)."""
    return DEBUG.get() or os.environ.get("CAPTIONING_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` flags, and whether tracebacks are wanted (flag or env)."""
    args = [a for a in argv if a != "--debug"]
    return args, len(args) != len(argv) or debug_mode()


def add_note(err: BaseException, note: str) -> None:
    """``err.add_note(note)`` (Python >= 3.11 prints it under the traceback); also on 3.10."""
    if hasattr(err, "add_note"):
        err.add_note(note)
    else:  # pragma: no cover - Python 3.10
        err.__notes__ = [*getattr(err, "__notes__", []), note]  # type: ignore[attr-defined]


def exception_chain(err: BaseException) -> Iterator[BaseException]:
    """``err``, then what it was raised from (``__cause__``) or during (``__context__``), inwards."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None


def _top_package(module: str | None) -> str:
    return (module or "").split(".", 1)[0]


def _raised_in(err: BaseException) -> str:
    """Module that raised ``err``: its innermost traceback frame outside the standard library.

    ``Path(name).read_text()`` in our code raises FileNotFoundError inside ``pathlib``; the
    code that asked for the file is ours.
    """
    stdlib: frozenset[str] = getattr(sys, "stdlib_module_names", frozenset())
    tb, found = err.__traceback__, ""
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if not found or _top_package(module) not in stdlib:
            found = module
        tb = tb.tb_next
    return found


def _our_dirs() -> list[Path]:
    import importlib.util

    dirs = []
    for name in OUR_PACKAGES:
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            dirs.append(Path(location).resolve())
    return dirs


_FILE_LINE = re.compile(r'^\s*File "(?P<file>[^"]+)", line \d+')


def _worker_original(message: str) -> tuple[str, str] | None:
    """(file that raised, "Type: message") of an exception re-raised from a DataLoader worker.

    torch re-raises a worker's exception in the main process as the same type with the
    message "Caught X in DataLoader worker process N.\\nOriginal Traceback ...\\nmod.X: msg".
    """
    if "Original Traceback" not in message:
        return None
    lines = message.splitlines()
    last_file = max((i for i, line in enumerate(lines) if _FILE_LINE.match(line)), default=None)
    if last_file is None:
        return None
    rest = lines[last_file + 1 :]
    start = next((i for i, line in enumerate(rest) if line and not line[0].isspace()), None)
    if start is None:
        return None
    found = _FILE_LINE.match(lines[last_file])
    return (found["file"], "\n".join(rest[start:])) if found else None


def _is_ours(err: BaseException) -> bool:
    if _top_package(type(err).__module__) in OUR_PACKAGES or _top_package(_raised_in(err)) in OUR_PACKAGES:
        return True
    original = _worker_original(str(err)) if _raised_in(err).startswith("torch") else None
    if original is None:
        return False
    try:
        where = Path(original[0]).resolve()
    except OSError:
        return False
    return any(where.is_relative_to(d) for d in _our_dirs())


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, UserError):
        return True
    if type(err).__name__ == "MisconfigurationException" and _top_package(type(err).__module__) == "lightning":
        return True
    return isinstance(err, USER_ERROR_TYPES) and _is_ours(err)


def find_user_error(err: BaseException) -> BaseException | None:
    """The user error that stopped a command, looking through jsonargparse/Lightning wrappers.

    Walks the chain from ``err`` inwards: the first user error is returned; an exception raised
    by jsonargparse/Lightning code is a wrapper and is looked through; anything else (e.g. a
    bug while handling a user error) means ``err`` is not a user error: None.
    """
    for current in exception_chain(err):
        if _is_user_error(current):
            return current
        if _top_package(_raised_in(current)) not in _WRAPPING_PACKAGES:
            return None
    return None


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _message(err: BaseException) -> str:
    text = str(err)
    original = _worker_original(text)
    if original is not None:
        text = re.sub(r"^[\w.]+: ", "", original[1], count=1)  # drop "module.Type: "
    return _one_line(text) or type(err).__name__


def user_message(err: BaseException) -> str | None:
    """One line for ``error: ...`` when ``err`` is a user error (module docstring), else None.

    The user error's own message, then the notes attached to any exception on the way to it.
    """
    user = find_user_error(err)
    if user is None:
        return None
    notes: list[str] = []
    for current in exception_chain(err):
        notes += [_one_line(n) for n in getattr(current, "__notes__", ()) if _one_line(n) not in notes]
        if current is user:
            break
    return "; ".join([_message(user), *notes])


def print_user_error(err: BaseException, file=None) -> bool:
    """Print ``error: <one line>`` for a user error (True), or nothing (False: a bug)."""
    message = user_message(err)
    if message is None:
        return False
    print(f"error: {message}", file=file or sys.stderr, flush=True)
    return True
