"""``captioning cache-features --config CFG.yaml [--data.init_args... overrides]``: encode every image
of a cached config once (:mod:`captioning.data.feature_cache`), as ``fit`` would on its first run."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def main(argv: Sequence[str] | None = None) -> int:
    """``captioning cache-features --config CFG.yaml [--data.init_args... overrides]``.

    Builds the caches of a cached config (data: CachedFeaturesDataModule) with the config's
    model encoder, exactly as ``fit`` would on its first run (the same CLI parses the config);
    valid caches are kept.
    """
    from captioning.commands.lightning_cli import lightning_cli, nested_null_args

    cli = lightning_cli(nested_null_args(list(argv or [])), run=False)
    data = cli.datamodule
    if not hasattr(data, "build_cache"):
        raise ValueError(
            f"cache-features: the config's data is {type(data).__name__}; use a cached config "
            "(data.class_path: captioning.data.cached.CachedFeaturesDataModule)"
        )
    device = "cuda" if torch.cuda.is_available() else None
    for split, cache in data.build_cache(cli.model.encoder, device=device).items():
        print(f"{split}: {len(cache)} images, {cache.grid[0]}x{cache.grid[1]}x{cache.channels} float16 -> {cache.path}")
    return 0
