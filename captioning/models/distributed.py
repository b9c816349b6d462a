"""Small helpers for code that must give the same answer on 1 or N processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate a picklable list from every rank, in rank order (identity on one process).

    Used for generated captions before corpus-level metrics: BLEU/CIDEr are not averages
    of per-batch values, so every rank needs every caption.
    """
    if world_size() == 1:
        return list(items)
    gathered: list[list[Any] | None] = [None] * world_size()
    dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in (part or [])]


def gather_unique(items: list[dict], key: str | Callable[[dict], Any]) -> dict[Any, dict]:
    """Every rank's items, one per id (``item[key]``, or ``key(item)``), in a fixed (sorted) order.

    The distributed sampler pads the last shard by repeating items: they share an id and
    collapse here. The fixed order makes float sums (e.g. CIDEr's mean) bit-identical on
    any number of processes.
    """
    get = key if callable(key) else (lambda item: item[key])
    unique = {get(item): item for item in gather_objects(items)}
    return dict(sorted(unique.items(), key=lambda kv: str(kv[0])))
