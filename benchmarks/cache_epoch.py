"""One training epoch from cached features vs encoding on the fly; prints ONE JSON object.

    python benchmarks/cache_epoch.py --threads 2 --out benchmarks/results/cache_epoch_cpu_2t.json

Built-in shapes dataset, the setup of configs/shapes_cached.yaml: a FROZEN ImageEncoder
(ResNet-18, random weights: no download; weights do not change the cost) at 128 px -> 4x4x512
grid, and the same decoder in both arms. Per epoch, every training image once with one
random caption (the shapes convention), batch 64, AdamW:

* ``on_the_fly``: draw each image, encode it with the frozen encoder (no gradient), train
  the decoder: what configs/shapes_cached.yaml would do without a cache.
* ``cached``: read float16 features from the memory-mapped cache, train the decoder; random
  batches (same padding as on the fly: isolates the effect of caching) and, separately,
  length-bucketed batches (``cached_bucketed``: the config's default).
* ``build``: the one-off cost of encoding every image once (train split only here).

Fair comparison: same images, captions per epoch, batch size, decoder, optimiser and loop;
both arms skip the encoder's backward (it is frozen); the on-the-fly arm pays image
drawing and encoding, which is exactly the work the cache removes. With ResNet-101 at
256 px (configs/coco.yaml) the encoder share, hence the gain, is far larger.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioning.data.cached import CachedFeaturesDataModule  # noqa: E402
from captioning.data.shapes import ShapesDataModule  # noqa: E402
from captioning.models.image_captioner import ImageCaptioner  # noqa: E402
from captioning.nn.torchvision_encoder import ImageEncoder  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--train-size", type=int, default=1024, help="training images per epoch")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per arm (median reported)")
    p.add_argument("--cache-dir", default=None, help="default: a temporary folder")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def make_model(a: argparse.Namespace, shapes: ShapesDataModule) -> ImageCaptioner:
    torch.manual_seed(0)
    encoder = ImageEncoder(a.backbone, weights=None, grid_size=a.image_size // 32, trainable_from=None)
    return ImageCaptioner(
        encoder, shapes.vocab.to_dict(), embed_dim=128, decoder_dim=256, attention_dim=128, dropout=0.3
    )


def epoch_seconds(model: ImageCaptioner, loader, epoch: int) -> tuple[float, int]:
    """One epoch of decoder training; returns (seconds, decode steps summed over batches)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
    steps = 0
    start = time.perf_counter()
    for batch in loader:
        total, _, _ = model.loss(model.encode(batch), batch["captions"])
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        steps += batch["captions"].shape[1] - 1
    return time.perf_counter() - start, steps


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    on = f"cpu:{torch.get_num_threads()} threads"
    shapes = ShapesDataModule(
        batch_size=a.batch_size, image_size=a.image_size, train_size=a.train_size, val_size=1, test_size=1
    )
    model = make_model(a, shapes)
    cache_dir = a.cache_dir or tempfile.mkdtemp(prefix="cache_epoch_")
    report = {
        "on": on,
        "load_avg_1min_before": round(os.getloadavg()[0], 2),
        "setup": {
            "dataset": "built-in shapes",
            "train_images": a.train_size,
            "image_size": a.image_size,
            "encoder": f"ImageEncoder({a.backbone}, weights=None, frozen)",
            "grid": f"{a.image_size // 32}x{a.image_size // 32}x{model.encoder.out_channels}",
            "batch_size": a.batch_size,
            "captions_per_epoch": "one random caption per image",
        },
    }

    cached = CachedFeaturesDataModule(shapes, cache_dir, captions_per_epoch="one", bucket_by_length=False)
    start = time.perf_counter()
    loader, count = cached._image_batches("train")
    from captioning.data.feature_cache import build_feature_cache

    build_feature_cache(model.encoder, loader, count, Path(cache_dir) / "train")
    report["build_seconds_train_split"] = round(time.perf_counter() - start, 2)
    for split in ("val", "test"):  # tiny; the datamodule wants every split
        loader, count = cached._image_batches(split)
        build_feature_cache(model.encoder, loader, count, Path(cache_dir) / split)
    cached.setup()
    bucketed = CachedFeaturesDataModule(shapes, cache_dir, captions_per_epoch="one", bucket_by_length=True)
    bucketed.setup()

    arms = {
        "on_the_fly": shapes.train_dataloader(),
        "cached": cached.train_dataloader(),
        "cached_bucketed": bucketed.train_dataloader(),
    }
    for name, loader in arms.items():
        model = make_model(a, shapes)
        epoch_seconds(model, loader, epoch=100)  # warm-up epoch (allocator, page cache)
        runs = [epoch_seconds(model, loader, epoch=e) for e in range(a.epochs)]
        report[f"{name}_epoch_seconds"] = {
            "value": round(statistics.median(r[0] for r in runs), 2),
            "samples": [round(r[0], 2) for r in runs],
            "on": on,
            "decode_steps_per_epoch": runs[-1][1],
        }
    fly = report["on_the_fly_epoch_seconds"]["value"]
    report["speedup_cached"] = round(fly / report["cached_epoch_seconds"]["value"], 2)
    report["speedup_cached_bucketed"] = round(fly / report["cached_bucketed_epoch_seconds"]["value"], 2)
    report["break_even_epochs"] = round(
        report["build_seconds_train_split"] / max(1e-9, fly - report["cached_epoch_seconds"]["value"]), 2
    )
    report["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(report, indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
