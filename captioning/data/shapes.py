"""Built-in synthetic captioning dataset: coloured shapes on a cluttered background.

Every image is generated on the fly from ``(seed, split, index)``, so item ``i`` of a split is
the same in every process and run, and no files are needed (this is the offline default).

A scene holds 1-4 objects (shape x colour x size, no two sharing shape and colour) placed
without overlap. Captions name every object ("a large red circle to the left of a small blue
square"); scenes of 3-4 objects list them left to right. Getting order and attribute binding
right needs *where* each object is, which a model that only sees the mean image feature
loses: that is what makes attention matter here. ``python -m captioning.data.shapes --out DIR
--count N`` writes test images as PNG files.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from captioning.data.batches import MovesTensorsOnly, collate_captions
from captioning.data.images import FollowsEncoder, Preprocessing
from captioning.data.shape_scenes import MAX_OBJECTS, SPLITS, Scene, generate_scene, named_boxes, shapes_vocabulary
from captioning.data.vocab import Vocabulary
from captioning.hyperparameters import TypedHyperparameters


class ShapesDataset(Dataset):
    """One split of the synthetic dataset.

    ``per_caption=True`` (train): each draw returns one reference chosen at random (torch RNG,
    so seeded per worker). Otherwise: the first reference as "caption", all as "references".
    ``keep_scenes=True``: a scene is drawn once and kept in memory (each epoch reads the same
    images; every DataLoader worker keeps the ones it drew).
    """

    def __init__(
        self,
        split: str,
        size: int,
        vocab: Vocabulary,
        seed: int = 0,
        image_size: int = 64,
        min_objects: int = 1,
        max_objects: int = 4,
        noise: float = 0.5,
        per_caption: bool = False,
        with_captions: bool = True,
        input_size: int | None = None,
        keep_scenes: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split, self.size, self.vocab, self.seed = split, size, vocab, seed
        self.image_size, self.min_objects, self.max_objects = image_size, min_objects, max_objects
        self.noise, self.per_caption, self.with_captions = noise, per_caption, with_captions
        self.input_size = input_size or image_size  # side of the images in batches (the encoder's)
        self.kept: dict[int, tuple[Scene, np.ndarray]] | None = {} if keep_scenes else None

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> Scene:
        """The scene at ``index``: a pure function of (seed, split, index) and the settings."""
        if not 0 <= index < self.size:
            raise IndexError(f"{self.split} split has {self.size} images, got index {index}")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        return generate_scene(rng, self.image_size, n, self.noise)

    def _scene_and_pixels(self, index: int) -> tuple[Scene, np.ndarray]:
        """The scene and its pixels at the encoder's input size, drawn once when scenes are kept."""
        if self.kept is not None and index in self.kept:
            return self.kept[index]
        scene = self.scene(index)
        pixels = scene.pixels
        if self.input_size != self.image_size:  # drawn at image_size, resized for the encoder
            pixels = np.array(Image.fromarray(pixels).resize((self.input_size,) * 2, Image.Resampling.BILINEAR))
        if self.kept is not None:
            self.kept[index] = (scene, pixels)
        return scene, pixels

    def __getitem__(self, index: int) -> dict:
        scene, pixels = self._scene_and_pixels(index)
        # Copies (12 KB): what a caller changes in an item must not change a kept scene.
        image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)  # uint8; the encoder normalises
        k = int(torch.randint(len(scene.captions), ())) if self.per_caption else 0
        ids = self.vocab.encode(scene.captions[k].split()) if self.with_captions else []
        return {
            "image": image,
            "caption": torch.tensor(ids, dtype=torch.long),
            "image_id": index,
            "references": list(scene.captions),
            "objects": [dict(o, box=list(o["box"])) for o in scene.objects],
            "boxes": named_boxes(scene.objects),
        }


class ShapesDataModule(TypedHyperparameters, FollowsEncoder, MovesTensorsOnly, L.LightningDataModule):
    """Synthetic shapes captions; see the module docstring.

    Args:
        batch_size: images (or image-caption pairs) per batch.
        num_workers: DataLoader worker processes.
        image_size: side in pixels the scenes are drawn at (>= 64); batches are resized to
            the model encoder's input size when it differs.
        seed: dataset seed; item i of a split depends only on (seed, split, i) and settings.
        train_size, val_size, test_size: images per split (predict uses the test split).
        min_objects, max_objects: objects per training scene (1..4).
        eval_min_objects, eval_max_objects: objects per val/test/predict scene; None = the
            training limits. E.g. 3 and 4 to compare attention with a mean-feature model.
        noise: background clutter and pixel noise in [0, 1]; 0 = plain background.
        keep_scenes: draw each scene once and keep it in memory for the later epochs and
            validations (train_size * input_size**2 * 3 bytes: 98 MB at the defaults, per
            DataLoader worker); False draws every scene again each time it is read.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int = 64,
        seed: int = 0,
        train_size: int = 8000,
        val_size: int = 500,
        test_size: int = 500,
        min_objects: int = 1,
        max_objects: int = 4,
        eval_min_objects: int | None = None,
        eval_max_objects: int | None = None,
        noise: float = 0.5,
        keep_scenes: bool = True,
    ) -> None:
        super().__init__()
        eval_min = min_objects if eval_min_objects is None else eval_min_objects
        eval_max = max_objects if eval_max_objects is None else eval_max_objects
        for name, value, low, high in (
            ("batch_size", batch_size, 1, None),
            ("num_workers", num_workers, 0, None),
            ("image_size", image_size, 64, None),
            ("train_size", train_size, 1, None),
            ("val_size", val_size, 1, None),
            ("test_size", test_size, 1, None),
            ("min_objects", min_objects, 1, MAX_OBJECTS),
            ("max_objects", max_objects, 1, MAX_OBJECTS),
            ("eval_min_objects", eval_min, 1, MAX_OBJECTS),
            ("eval_max_objects", eval_max, 1, MAX_OBJECTS),
        ):
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < low
                or (high is not None and value > high)
            ):
                bound = f">= {low}" if high is None else f"in {low}..{high}"
                raise ValueError(f"ShapesDataModule: {name} must be an int {bound}, got {value!r}")
        for prefix, lo, hi in (("", min_objects, max_objects), ("eval_", eval_min, eval_max)):
            if lo > hi:
                raise ValueError(f"ShapesDataModule: {prefix}min_objects ({lo}) must be <= {prefix}max_objects ({hi})")
        if not isinstance(noise, (int, float)) or not 0.0 <= noise <= 1.0:
            raise ValueError(f"ShapesDataModule: noise must be in [0, 1], got {noise!r}")
        self.save_hyperparameters()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.draw_size, self.noise, self.keep_scenes = image_size, float(noise), bool(keep_scenes)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.limits = {"train": (min_objects, max_objects), "val": (eval_min, eval_max), "test": (eval_min, eval_max)}
        self._vocab = shapes_vocabulary()

    @property
    def vocab_data(self) -> dict:
        """The vocabulary as plain data: what the CLI links into ``model.init_args.vocab``."""
        return self.vocab.to_dict()

    @property
    def vocab(self) -> Vocabulary:
        return self._vocab

    def default_preprocessing(self) -> Preprocessing:
        return Preprocessing(self.draw_size)

    def dataset(self, split: str, per_caption: bool = False, with_captions: bool = True) -> ShapesDataset:
        """The :class:`ShapesDataset` of ``split`` ("train", "val" or "test")."""
        lo, hi = self.limits.get(split, (1, 1))  # an unknown split: ShapesDataset raises
        return ShapesDataset(
            split,
            self.sizes.get(split, 0),
            self._vocab,
            self.seed,
            self.draw_size,
            lo,
            hi,
            self.noise,
            per_caption,
            with_captions,
            input_size=self.image_size,
            keep_scenes=self.keep_scenes,
        )

    def caption_references(self, split: str) -> dict[int, list[str]]:
        """``{index: [reference, ...]}`` of every scene of ``split`` (self-critical training's
        reward corpus; the scenes are generated, about a millisecond each)."""
        data = self.dataset(split)
        return {i: list(data.scene(i).captions) for i in range(len(data))}

    def describe(self) -> str:
        return (
            f"built-in shapes (seed {self.seed}; {self.sizes['train']} train, {self.sizes['val']} val, "
            f"{self.sizes['test']} test scenes)"
        )

    def example(self, split: str = "val") -> dict:
        """The first scene of ``split`` as a PIL image, its id and references (model cards)."""
        scene = self.dataset(split).scene(0)
        return {"image": Image.fromarray(scene.pixels, "RGB"), "image_id": 0, "references": list(scene.captions)}

    def _loader(self, dataset: ShapesDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_captions,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train", per_caption=True), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test", with_captions=False), shuffle=False)

    def export_images(
        self, split: str = "test", indices: Sequence[int] = (0,), out_dir: str | Path = "."
    ) -> list[Path]:
        """Write images of ``split`` as ``shapes_<split>_<index>.png`` in ``out_dir``; returns paths."""
        dataset, out = self.dataset(split), Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"shapes_{split}_{int(i):05d}.png" for i in indices]
        for i, path in zip(indices, paths):
            Image.fromarray(dataset.scene(int(i)).pixels, "RGB").save(path)  # as drawn (draw size)
        return paths


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m captioning.data.shapes --out DIR --count N``: write test images, print captions."""
    parser = argparse.ArgumentParser(description="Write images of the synthetic shapes dataset as PNG.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--count", type=int, default=4, help="number of images (default 4)")
    parser.add_argument("--start", type=int, default=0, help="first index (default 0)")
    parser.add_argument("--split", choices=SPLITS, default="test")
    for flag, kind, default in (("--seed", int, 0), ("--image-size", int, 64), ("--noise", float, 0.5)):
        parser.add_argument(flag, type=kind, default=default, help=f"default {default}")
    args = parser.parse_args(argv)
    if args.count < 1 or args.start < 0:
        parser.error(f"--count must be >= 1 and --start >= 0, got {args.count} and {args.start}")
    indices = range(args.start, args.start + args.count)
    try:
        sizes: dict[str, Any] = {f"{args.split}_size": indices.stop}
        dm = ShapesDataModule(image_size=args.image_size, seed=args.seed, noise=args.noise, **sizes)
    except ValueError as err:
        parser.error(str(err))
    dataset = dm.dataset(args.split)
    for i, path in zip(indices, dm.export_images(args.split, indices, args.out)):
        print(f"{path}\t{dataset.scene(i).captions[0]}")


if __name__ == "__main__":
    main()
