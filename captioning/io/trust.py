"""What a model file may make us build: only model classes we ship, or ones the user trusts.

Checkpoints and exported model folders name the classes to rebuild (``class_path``) and their
constructor arguments. A file can come from anyone, and importing or calling what it names
runs code, so :func:`build_model` only ever builds:

* a model class or an encoder we ship (:mod:`captioning.registry`; also under the class paths
  of earlier releases) — never any other function or class of our
  packages, however harmless its name looks;
* a class from a module the user trusted explicitly (``--trust_module NAME`` on the command
  line, ``trust_modules=[...]`` in Python, or ``CAPTIONING_TRUST_MODULES=name1,name2``), in the
  spirit of Hugging Face's ``trust_remote_code``: a user encoder (a subclass of
  :class:`captioning.nn.encoders.Encoder`) or model (a LightningModule).

Constructor arguments are checked against the class's signature (no unknown names, no missing
required ones) and must be plain data (None, bool, numbers, strings, lists, dicts); the only
nested class allowed is an encoder, built by the same rules.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from torch import nn

from captioning import registry
from captioning.nn.encoders import Encoder

TRUST_ENV = "CAPTIONING_TRUST_MODULES"
_CLASS_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
# Arguments older releases stored that no longer exist: dropped when they hold the old default.
_RETIRED_ARGS = {"captioning.nn.encoders.SmallCNN": {"in_channels": 3}}


class UntrustedClassError(ValueError):
    """A file names a class we do not build without the user's explicit trust."""


def trusted_modules(extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The modules the user trusts: ``extra`` plus ``$CAPTIONING_TRUST_MODULES`` (comma-separated)."""
    env = [m.strip() for m in os.environ.get(TRUST_ENV, "").split(",") if m.strip()]
    return tuple(dict.fromkeys([*(m.strip() for m in extra if m.strip()), *env]))


def _is_trusted(module: str, trust: Sequence[str]) -> bool:
    return any(module == t or module.startswith(t + ".") for t in trust)


def _import_trusted(module_name: str, ours: bool) -> Any:
    """Import ``module_name``; a user module the user trusted is also looked for in the current
    folder, as ``python -m`` and ``python script.py`` would (the ``captioning`` console script's
    own folder is not the user's)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        top = module_name.split(".")[0]
        cwd = os.getcwd()
        if ours or err.name != top or cwd in sys.path:
            raise
        if not (os.path.isfile(os.path.join(cwd, top + ".py")) or os.path.isdir(os.path.join(cwd, top))):
            raise
        sys.path.append(cwd)  # after everything installed: never shadows an installed module
        return importlib.import_module(module_name)


def user_modules(config: Any) -> list[str]:
    """Top-level modules outside this package that a model config names (its class, its encoder):
    what a reader must have, and trust, to load it."""
    found = []
    for spec in (config, (config.get("init_args") or {}).get("encoder") if isinstance(config, dict) else None):
        path = spec.get("class_path") if isinstance(spec, dict) else None
        if isinstance(path, str) and "." in path:
            top = registry.current_class_path(path).split(".")[0]
            if top != "captioning" and top not in found:
                found.append(top)
    return found


def resolve_class(class_path: Any, kind: str, trust: Sequence[str] = (), source: str = "a model file") -> type:
    """The class ``class_path`` names, if it may be built as a ``kind`` ("model" or "encoder")."""
    if not isinstance(class_path, str) or not _CLASS_PATH.match(class_path):
        raise ValueError(f"{source}: {class_path!r} is not a class path (module.Class)")
    class_path = registry.current_class_path(class_path)
    ours = registry.class_paths(kind)
    base = nn.Module if kind == "model" else Encoder
    module_name, name = class_path.rsplit(".", 1)
    if class_path not in ours:
        top = module_name.split(".")[0]
        if top == "captioning" and not _is_trusted(module_name, trust):
            raise UntrustedClassError(
                f"{source} names {class_path!r} as its {kind}; only these are built: {', '.join(ours)}"
            )
        if not _is_trusted(module_name, trust):
            raise UntrustedClassError(
                f"{source} names {class_path!r} as its {kind}, a class outside this package: refusing to import "
                f"it. If you trust that code, allow it with --trust_module {top} (Python: "
                f"trust_modules=['{top}']; or {TRUST_ENV}={top}); importing it runs it."
            )
    try:
        obj = getattr(_import_trusted(module_name, class_path in ours), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"{source}: cannot import {class_path!r} ({err}); install its module, or run from the folder "
            "that holds it, or add that folder to PYTHONPATH"
        ) from err
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        raise UntrustedClassError(
            f"{source}: {class_path!r} is not a{'n' if kind == 'encoder' else ''} "
            f"{kind} class (a subclass of {base.__module__}.{base.__qualname__})"
        )
    return obj


def check_plain(value: Any, where: str) -> None:
    """Raise unless ``value`` is plain data: None, bool, int, finite float, str, list/tuple,
    dict[str, ...], within :mod:`captioning.io.plain_data`'s limits (size, depth, no cycles)."""
    from captioning.io.plain_data import check_plain_data

    check_plain_data(value, where, finite=True, tensors=False, str_keys=True)


def check_init_args(cls: type, args: dict, source: str) -> dict:
    """``args`` validated against ``cls``'s signature; private ``_keys`` dropped."""
    if not isinstance(args, dict):
        raise ValueError(f"{source}: the arguments of {cls.__name__} must be a dict, got {type(args).__name__}")
    args = {k: v for k, v in args.items() if not (isinstance(k, str) and k.startswith("_"))}
    retired = _RETIRED_ARGS.get(f"{cls.__module__}.{cls.__qualname__}", {})
    args = {k: v for k, v in args.items() if not (k in retired and v == retired[k])}
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(args) - named)
    if unknown and not takes_any:
        raise ValueError(
            f"{source}: {cls.__name__} has no argument(s) {unknown}; the file does not match this version of the class"
        )
    missing = sorted(n for n in named if params[n].default is inspect.Parameter.empty and n not in args)
    if missing:
        raise ValueError(f"{source}: required argument(s) {missing} of {cls.__name__} are missing")
    check_plain(args, f"{source}: {cls.__name__} arguments")  # one walk, one budget for all of them
    return args


def build_encoder(spec: Any, trust: Sequence[str] = (), source: str = "a model file", restore: bool = True) -> Encoder:
    """``{"class_path", "init_args"}`` -> the encoder. ``restore``: without downloading pretrained
    weights (:meth:`captioning.nn.encoders.Encoder.restore_args`: the model file holds the trained
    ones); False builds it as configured (pretrained weights included)."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{source}: the encoder must be a dict with class_path and init_args, got {spec!r}")
    cls = resolve_class(spec["class_path"], "encoder", trust, source)
    assert issubclass(cls, Encoder)  # resolve_class checked it
    args = check_init_args(cls, spec.get("init_args") or {}, source)
    return _construct(cls, cls.restore_args(args) if restore else args, source)


def build_model(class_path: Any, init_args: dict, trust: Sequence[str] = (), source: str = "a model file") -> Any:
    """The model ``class_path`` names, built from ``init_args`` (an encoder spec among them is
    built by :func:`build_encoder`); weights are not loaded here."""
    cls = resolve_class(class_path, "model", trust, source)
    args = dict(init_args)
    encoder = args.get("encoder")
    if isinstance(encoder, dict) and "image_size" in args and isinstance(encoder.get("init_args"), dict):
        # Checkpoints of older releases kept the input size on the model.
        size = args.pop("image_size")
        if size is not None:
            encoder["init_args"].setdefault("image_size", size)
    args = check_init_args(cls, args, source)
    for key, value in list(args.items()):
        if isinstance(value, dict) and "class_path" in value:
            if key != "encoder":
                raise ValueError(f"{source}: only the encoder may be a nested class, not {key!r}")
            args[key] = build_encoder(value, trust, source)
    return _construct(cls, args, source)


def _construct(cls: type, args: dict, source: str) -> Any:
    """``cls(**args)``; arguments of the wrong type or value end in one message naming the file."""
    try:
        return cls(**args)
    except UntrustedClassError:
        raise
    except Exception as err:  # noqa: BLE001 - data from a file: any failure means "this file is wrong"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"{source}: cannot build {cls.__name__} from its stored arguments ({err.__class__.__name__}: {reason})"
        ) from err
