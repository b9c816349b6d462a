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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from captioning.data.images import Preprocessing
from captioning.data.vocab import Vocabulary, tokenize
from captioning.data.batches import MovesTensorsOnly, collate_captions
from captioning.data.image_captions import FollowsEncoder

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
SIZES: tuple[str, ...] = ("small", "large")
SPLITS: tuple[str, ...] = ("train", "val", "test")
MAX_OBJECTS = 4

RGB = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 225),
       "yellow": (235, 215, 45), "purple": (150, 60, 190)}
# Side of an object's bounding box as a fraction of the image side; the gap between the two
# ranges keeps "small" and "large" tellable apart after jitter.
SIZE_RANGE = {"small": (0.15, 0.19), "large": (0.27, 0.32)}
_MARGIN = 0.02  # free border around the image and between object boxes
_MIN_X_GAP = 0.1  # left-to-right order of 3-4 objects must be visible, not a coin flip

# Reference phrasings; "{i}" is the i-th object phrase ("large red circle") in the scene's
# order. Five per case so eval items have five references, as COCO does.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "one": ("a {0}", "there is a {0}", "a single {0}", "an image with a {0}",
            "one {0} on its own"),
    "two_h": ("a {0} to the left of a {1}", "a {1} to the right of a {0}",
              "a {0} on the left and a {1} on the right", "there is a {0} left of a {1}",
              "two shapes a {0} and a {1} from left to right"),
    "two_v": ("a {0} above a {1}", "a {1} below a {0}",
              "a {0} at the top and a {1} at the bottom", "there is a {0} over a {1}",
              "two shapes a {0} and a {1} from top to bottom"),
    "three": ("a {0} , a {1} and a {2} from left to right",
              "from left to right a {0} , a {1} and a {2}",
              "a {0} on the left , a {1} in the middle and a {2} on the right",
              "three shapes a {0} then a {1} then a {2}",
              "three shapes in a row a {0} , a {1} and a {2}"),
    "four": ("a {0} , a {1} , a {2} and a {3} from left to right",
             "from left to right a {0} , a {1} , a {2} and a {3}",
             "a {0} on the left , then a {1} , a {2} and a {3} on the right",
             "four shapes a {0} then a {1} then a {2} then a {3}",
             "four shapes in a row a {0} , a {1} , a {2} and a {3}"),
}
NUM_REFERENCES = 5


def shapes_vocabulary() -> Vocabulary:
    """Every word the grammar can produce, sorted (fixed and deterministic, no data needed)."""
    words = set(SHAPES) | set(COLORS) | set(SIZES)
    for templates in TEMPLATES.values():
        for template in templates:
            words.update(tokenize(template.format(*[""] * MAX_OBJECTS)))
    return Vocabulary(sorted(words))


@dataclass(frozen=True)
class Scene:
    """One generated image: pixels (H, W, 3) uint8, its objects and its reference captions.

    ``objects`` are in the order the captions name them: left to right (top to bottom for a
    vertical pair), so ``objects[k]`` is the k-th object of the first reference.
    """

    pixels: np.ndarray
    objects: list[dict]
    captions: list[str]


def _layout(rng: np.random.Generator, sides: Sequence[float]) -> list[list[float]]:
    """Boxes [x0, y0, x1, y1] in [0, 1] for objects of the given sides, by rejection sampling.

    Boxes (grown by the margin) never intersect; with 3+ objects the x centres are at least
    ``_MIN_X_GAP`` apart so "left to right" has one answer.
    """
    n = len(sides)
    for _ in range(100):
        boxes: list[list[float]] = []
        for side in sides:
            for _ in range(30):
                x0, y0 = rng.uniform(_MARGIN, 1 - _MARGIN - side, size=2)
                box = [float(x0), float(y0), float(x0 + side), float(y0 + side)]
                cx = (box[0] + box[2]) / 2
                if all(box[0] >= b[2] + _MARGIN or b[0] >= box[2] + _MARGIN
                       or box[1] >= b[3] + _MARGIN or b[1] >= box[3] + _MARGIN for b in boxes) \
                        and (n < 3 or all(abs(cx - (b[0] + b[2]) / 2) >= _MIN_X_GAP for b in boxes)):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == n:
            return boxes
    # Not reached in 6000 worst-case trials (measured); a fixed zig-zag row is always valid.
    left = _MARGIN + max(sides) / 2
    cx = np.linspace(left, 1 - left, n) if n > 1 else [0.5]
    return [[c - s / 2, _MARGIN if i % 2 == 0 else 1 - _MARGIN - s,
             c + s / 2, _MARGIN + s if i % 2 == 0 else 1 - _MARGIN]
            for i, (c, s) in enumerate(zip(map(float, cx), sides))]


def _caption_order(objects: list[dict]) -> tuple[str, list[int]]:
    """Which templates describe the scene, and the object order they name (by position)."""
    centre = [((o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2) for o in objects]
    n = len(objects)
    if n == 2:
        # The larger centre displacement picks left/right or above/below. For disjoint
        # square boxes that axis always separates the boxes, so the relation holds for the
        # whole objects, not only their centres.
        dx, dy = abs(centre[0][0] - centre[1][0]), abs(centre[0][1] - centre[1][1])
        axis = 0 if dx >= dy else 1
        return ("two_h" if axis == 0 else "two_v"), sorted(range(2), key=lambda i: centre[i][axis])
    return {1: "one", 3: "three", 4: "four"}[n], sorted(range(n), key=lambda i: centre[i][0])


def generate_scene(rng: np.random.Generator, image_size: int = 64, num_objects: int = 2,
                   noise: float = 0.5) -> Scene:
    """Draw one scene with ``num_objects`` objects; ``noise`` in [0, 1] scales the clutter."""
    s = image_size
    combos = rng.choice(len(SHAPES) * len(COLORS), size=num_objects, replace=False)
    sizes = [SIZES[i] for i in rng.integers(len(SIZES), size=num_objects)]
    sides = [float(rng.uniform(*SIZE_RANGE[z])) for z in sizes]
    boxes = _layout(rng, sides)
    objects = [{"shape": SHAPES[c // len(COLORS)], "color": COLORS[c % len(COLORS)],
                "size": z, "box": [round(v, 4) for v in box]}
               for c, z, box in zip(combos, sizes, boxes)]
    key, order = _caption_order(objects)
    objects = [objects[i] for i in order]
    phrases = [f"{o['size']} {o['color']} {o['shape']}" for o in objects]
    captions = [" ".join(tokenize(t.format(*phrases))) for t in TEMPLATES[key]]

    # Background: grey with a slight tint, smooth blotches (mostly brightness: strong colour
    # blotches could pass for a faint object colour), grey dots, then thin grey lines.
    # Clutter is never in an object colour, so it cannot be mistaken for an object.
    blotch = rng.normal(0, 1, size=(4, 4, 1)) * 28 + rng.normal(0, 1, size=(4, 4, 3)) * 8
    up = _upsampler(s)  # (s, 4) bilinear weights: blotch (4, 4, 3) -> (s, s, 3)
    rows = (up @ (blotch * noise).reshape(4, 12)).reshape(s, 4, 3)  # (s, 4, 3)
    bg = np.matmul(up, rows)  # (s, s, 3); plain matmuls, a 3-operand einsum is ~50x slower
    bg += rng.uniform(95, 165) + rng.uniform(-12, 12, size=3)
    n_dots = rng.poisson(25 * noise * (s / 64) ** 2)
    ys, xs = rng.integers(0, s - 1, size=(2, n_dots))
    grey = rng.integers(30, 230, size=(n_dots, 1))
    for dy in (0, 1):  # 2x2 dots
        for dx in (0, 1):
            bg[ys + dy, xs + dx] = grey
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    n_lines = rng.poisson(6 * noise)
    for (x0, y0, x1, y1), g in zip(rng.uniform(0, s, size=(n_lines, 4)).tolist(),
                                   rng.integers(30, 230, size=n_lines).tolist()):
        draw.line([(x0, y0), (x1, y1)], fill=(g, g, g), width=max(1, s // 96))

    jitter = rng.integers(-15, 16, size=(num_objects, 3)).tolist()
    for obj, dc in zip(objects, jitter):
        x0, y0, x1, y1 = (v * s for v in obj["box"])
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        fill = tuple(min(255, max(0, c + d)) for c, d in zip(RGB[obj["color"]], dc))
        if obj["shape"] == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)

    pixels = np.array(img)  # a writable copy (torch.from_numpy warns on read-only arrays)
    amp = int(20 * noise)
    if amp > 0:  # sensor-like pixel noise over everything, objects included
        # Random bytes scaled to [-amp, amp]: several times faster than rng.integers.
        rand = np.frombuffer(rng.bytes(pixels.size), np.uint8).reshape(pixels.shape)
        noisy = pixels.astype(np.int16) + ((rand.astype(np.int16) * (2 * amp + 1)) >> 8) - amp
        pixels = np.clip(noisy, 0, 255).astype(np.uint8)
    return Scene(pixels, objects, captions)


@lru_cache(maxsize=8)
def _upsampler(size: int) -> np.ndarray:
    """(size, 4) bilinear interpolation weights from a 4-point grid to ``size`` pixels."""
    pos = (np.arange(size) + 0.5) * 4 / size - 0.5  # pixel centres in grid coordinates
    return np.stack([np.interp(pos, np.arange(4), np.eye(4)[k]) for k in range(4)], axis=1)


def object_word_alignment(caption_tokens: Sequence[str], objects: Sequence[dict]) -> list[int | None]:
    """Per token, the index in ``objects`` of the object that the token's noun phrase names.

    A noun phrase is a shape word with the size/colour words right before it ("large red
    circle"); its tokens get the object index when exactly one object matches every word said,
    else ``None``; other tokens get ``None``. Works on generated captions (a wrongly named
    object gets ``None``); keep tokens ``in SHAPES`` to score only nouns.
    """
    out: list[int | None] = [None] * len(caption_tokens)
    for t, tok in enumerate(caption_tokens):
        if tok not in SHAPES:
            continue
        start, said = t, {"shape": tok}
        while start > 0 and caption_tokens[start - 1] in (*COLORS, *SIZES):
            start -= 1
            key = "color" if caption_tokens[start] in COLORS else "size"
            said.setdefault(key, caption_tokens[start])  # the word nearest the noun wins
        matches = [i for i, o in enumerate(objects) if all(o[k] == v for k, v in said.items())]
        if len(matches) == 1:
            out[start:t + 1] = [matches[0]] * (t + 1 - start)
    return out


class ShapesDataset(Dataset):
    """One split of the synthetic dataset.

    ``per_caption=True`` (train): each draw returns one reference chosen at random (torch RNG,
    so seeded per worker). Otherwise: the first reference as "caption", all as "references".
    ``keep_scenes=True``: a scene is drawn once and kept in memory (each epoch reads the same
    images; every DataLoader worker keeps the ones it drew).
    """

    def __init__(self, split: str, size: int, vocab: Vocabulary, seed: int = 0,
                 image_size: int = 64, min_objects: int = 1, max_objects: int = 4,
                 noise: float = 0.5, per_caption: bool = False, with_captions: bool = True,
                 input_size: int | None = None, keep_scenes: bool = False) -> None:
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
            pixels = np.array(Image.fromarray(pixels).resize((self.input_size,) * 2, Image.BILINEAR))
        if self.kept is not None:
            self.kept[index] = (scene, pixels)
        return scene, pixels

    def __getitem__(self, index: int) -> dict:
        scene, pixels = self._scene_and_pixels(index)
        # Copies (12 KB): what a caller changes in an item must not change a kept scene.
        image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)  # uint8; the encoder normalises
        k = int(torch.randint(len(scene.captions), ())) if self.per_caption else 0
        ids = self.vocab.encode(scene.captions[k].split()) if self.with_captions else []
        return {"image": image, "caption": torch.tensor(ids, dtype=torch.long), "image_id": index,
                "references": list(scene.captions), "objects": [dict(o, box=list(o["box"])) for o in scene.objects],
                "boxes": named_boxes(scene.objects)}


def named_boxes(objects: Sequence[dict]) -> list[dict]:
    """A scene's objects as the named boxes of captioning.eval.localisation (noun: shape; attributes: size, colour)."""
    return [{"box": list(o["box"]), "nouns": [o["shape"]], "attributes": [o["size"], o["color"]]} for o in objects]


class ShapesDataModule(FollowsEncoder, MovesTensorsOnly, L.LightningDataModule):
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

    def __init__(self, batch_size: int = 64, num_workers: int = 0, image_size: int = 64,
                 seed: int = 0, train_size: int = 8000, val_size: int = 500,
                 test_size: int = 500, min_objects: int = 1, max_objects: int = 4,
                 eval_min_objects: int | None = None, eval_max_objects: int | None = None,
                 noise: float = 0.5, keep_scenes: bool = True) -> None:
        super().__init__()
        eval_min = min_objects if eval_min_objects is None else eval_min_objects
        eval_max = max_objects if eval_max_objects is None else eval_max_objects
        for name, value, low, high in (
                ("batch_size", batch_size, 1, None), ("num_workers", num_workers, 0, None),
                ("image_size", image_size, 64, None), ("train_size", train_size, 1, None),
                ("val_size", val_size, 1, None), ("test_size", test_size, 1, None),
                ("min_objects", min_objects, 1, MAX_OBJECTS), ("max_objects", max_objects, 1, MAX_OBJECTS),
                ("eval_min_objects", eval_min, 1, MAX_OBJECTS),
                ("eval_max_objects", eval_max, 1, MAX_OBJECTS)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low \
                    or (high is not None and value > high):
                bound = f">= {low}" if high is None else f"in {low}..{high}"
                raise ValueError(f"ShapesDataModule: {name} must be an int {bound}, got {value!r}")
        for prefix, lo, hi in (("", min_objects, max_objects), ("eval_", eval_min, eval_max)):
            if lo > hi:
                raise ValueError(f"ShapesDataModule: {prefix}min_objects ({lo}) must be <= "
                                 f"{prefix}max_objects ({hi})")
        if not isinstance(noise, (int, float)) or not 0.0 <= noise <= 1.0:
            raise ValueError(f"ShapesDataModule: noise must be in [0, 1], got {noise!r}")
        self.save_hyperparameters()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.draw_size, self.noise, self.keep_scenes = image_size, float(noise), bool(keep_scenes)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.limits = {"train": (min_objects, max_objects), "val": (eval_min, eval_max),
                       "test": (eval_min, eval_max)}
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
        return ShapesDataset(split, self.sizes.get(split, 0), self._vocab, self.seed, self.draw_size,
                             lo, hi, self.noise, per_caption, with_captions, input_size=self.image_size,
                             keep_scenes=self.keep_scenes)

    def describe(self) -> str:
        return (f"built-in shapes (seed {self.seed}; {self.sizes['train']} train, {self.sizes['val']} val, "
                f"{self.sizes['test']} test scenes)")

    def example(self, split: str = "val") -> dict:
        """The first scene of ``split`` as a PIL image, its id and references (model cards)."""
        scene = self.dataset(split).scene(0)
        return {"image": Image.fromarray(scene.pixels, "RGB"), "image_id": 0, "references": list(scene.captions)}

    def _loader(self, dataset: ShapesDataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, collate_fn=collate_captions,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("train", per_caption=True), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test", with_captions=False), shuffle=False)

    def export_images(self, split: str = "test", indices: Sequence[int] = (0,),
                      out_dir: str | Path = ".") -> list[Path]:
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
        dm = ShapesDataModule(image_size=args.image_size, seed=args.seed, noise=args.noise,
                              **{f"{args.split}_size": indices.stop})
    except ValueError as err:
        parser.error(str(err))
    dataset = dm.dataset(args.split)
    for i, path in zip(indices, dm.export_images(args.split, indices, args.out)):
        print(f"{path}\t{dataset.scene(i).captions[0]}")


if __name__ == "__main__":
    main()
