"""Limits on the plain data a user's file hands us: hyper-parameters, configs, encoder specs.

A checkpoint's ``hyper_parameters`` (read with ``weights_only=True``), a model folder's
``config.json`` and an encoder YAML are trees of dicts, lists and scalars, but a hostile file
can make them huge without being large: pickle and YAML both let one object be referenced many
times ("billion laughs": ten lists of ten references to the level below, forty levels deep, is
a few kilobytes and 10^40 leaves to anything that walks it), nest them deeper than Python's
recursion, or make a list contain itself. :func:`check_plain_data` walks the tree once, counting
every visit (a shared object counts each time it is reached, which is what every later walk
pays), and stops at the first limit with one line naming the file and the path inside it.
:func:`load_yaml_text` reads YAML without aliases (no sharing to start with).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["PlainDataError", "check_plain_data", "load_yaml_text", "MAX_NODES", "MAX_DEPTH"]

MAX_NODES = 2_000_000  # a vocabulary of 100k words and its index are ~200k nodes
MAX_DEPTH = 64  # our deepest config nests about 8 levels
MAX_YAML_BYTES = 1 << 20


class PlainDataError(ValueError):
    """A file's plain data is too large, too deep, cyclic, or holds non-finite numbers."""


def check_plain_data(
    value: Any,
    source: str,
    max_nodes: int = MAX_NODES,
    max_depth: int = MAX_DEPTH,
    finite: bool = False,
    tensors: bool = True,
    str_keys: bool = False,
) -> None:
    """Refuse ``value`` (from ``source``) unless it is a tree of at most ``max_nodes`` visits and
    ``max_depth`` levels; ``finite``: floats must be finite too; ``tensors``: tensors are allowed
    leaves (a checkpoint's weights); ``str_keys``: dict keys must be strings. Iterative: no
    recursion limit to hit.

    Raises:
        PlainDataError: naming ``source`` and where in the tree the limit was hit.
    """
    visits = 0
    on_path: set[int] = set()
    # (value, depth, where, leaving): the marker "leaving" pops a container off the current path.
    stack: list[tuple[Any, int, str, bool]] = [(value, 0, "", False)]
    while stack:
        item, depth, where, leaving = stack.pop()
        if leaving:
            on_path.discard(id(item))
            continue
        visits += 1
        if visits > max_nodes:
            raise PlainDataError(
                f"{source}: its data has more than {max_nodes:,} entries (counting shared references each "
                "time); refused (a file this small cannot hold that much: it repeats references)"
            )
        if isinstance(item, (dict, list, tuple)):
            if depth >= max_depth:
                raise PlainDataError(f"{source}: data nested deeper than {max_depth} levels at {where or 'the top'}")
            if id(item) in on_path:
                raise PlainDataError(f"{source}: data contains itself at {where or 'the top'} (a cycle)")
            on_path.add(id(item))
            stack.append((item, depth, where, True))
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str) and (str_keys or not isinstance(key, (int, float, bool, type(None)))):
                        raise PlainDataError(f"{source}: key {key!r} at {where or 'the top'} is not a string")
                    stack.append((child, depth + 1, f"{where}.{key}" if where else str(key), False))
            else:
                for i, child in enumerate(item):
                    stack.append((child, depth + 1, f"{where}[{i}]", False))
        elif isinstance(item, float):
            if finite and not math.isfinite(item):
                raise PlainDataError(f"{source}: {where or 'the value'} is {item}, not a finite number")
        elif isinstance(item, torch.Tensor) and tensors:
            pass
        elif item is not None and not isinstance(item, (str, int, bool) if str_keys else (str, int, bool, bytes)):
            raise PlainDataError(
                f"{source}: {where or 'the value'} is a {type(item).__name__}, not plain data (only None, bool, "
                "numbers, strings, lists and dicts are accepted from a model file)"
            )


def load_yaml_text(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` refusing aliases (``*name``: shared references, the YAML bomb) and
    texts over 1 MiB, then :func:`check_plain_data`."""
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise PlainDataError(f"{source}: {len(text):,} characters; a config is at most {MAX_YAML_BYTES:,}")

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise PlainDataError(
                    f"{source}: YAML aliases (*{event.anchor}) are not accepted here; write the values out"
                )
            return super().compose_node(parent, index)

    value = yaml.load(text, Loader=NoAliases)  # noqa: S506 - a SafeLoader subclass
    check_plain_data(value, source, tensors=False)
    return value
