"""The scenes of the built-in shapes dataset: 1-4 coloured shapes on a cluttered background, each
with its captions, object boxes and the words that name each object.

A scene holds objects (shape x colour x size, no two sharing shape and colour) placed without
overlap. Captions name every object ("a large red circle to the left of a small blue square");
scenes of 3-4 objects list them left to right. :func:`generate_scene` draws one from a random
generator, so a scene is a pure function of its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from captioning.data.vocab import Vocabulary, tokenize

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
SIZES: tuple[str, ...] = ("small", "large")
SPLITS: tuple[str, ...] = ("train", "val", "test")
MAX_OBJECTS = 4

RGB = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 215, 45),
    "purple": (150, 60, 190),
}
# Side of an object's bounding box as a fraction of the image side; the gap between the two
# ranges keeps "small" and "large" tellable apart after jitter.
SIZE_RANGE = {"small": (0.15, 0.19), "large": (0.27, 0.32)}
_MARGIN = 0.02  # free border around the image and between object boxes
_MIN_X_GAP = 0.1  # left-to-right order of 3-4 objects must be visible, not a coin flip

# Reference phrasings; "{i}" is the i-th object phrase ("large red circle") in the scene's
# order. Five per case so eval items have five references, as COCO does.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "one": ("a {0}", "there is a {0}", "a single {0}", "an image with a {0}", "one {0} on its own"),
    "two_h": (
        "a {0} to the left of a {1}",
        "a {1} to the right of a {0}",
        "a {0} on the left and a {1} on the right",
        "there is a {0} left of a {1}",
        "two shapes a {0} and a {1} from left to right",
    ),
    "two_v": (
        "a {0} above a {1}",
        "a {1} below a {0}",
        "a {0} at the top and a {1} at the bottom",
        "there is a {0} over a {1}",
        "two shapes a {0} and a {1} from top to bottom",
    ),
    "three": (
        "a {0} , a {1} and a {2} from left to right",
        "from left to right a {0} , a {1} and a {2}",
        "a {0} on the left , a {1} in the middle and a {2} on the right",
        "three shapes a {0} then a {1} then a {2}",
        "three shapes in a row a {0} , a {1} and a {2}",
    ),
    "four": (
        "a {0} , a {1} , a {2} and a {3} from left to right",
        "from left to right a {0} , a {1} , a {2} and a {3}",
        "a {0} on the left , then a {1} , a {2} and a {3} on the right",
        "four shapes a {0} then a {1} then a {2} then a {3}",
        "four shapes in a row a {0} , a {1} , a {2} and a {3}",
    ),
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
                if all(
                    box[0] >= b[2] + _MARGIN
                    or b[0] >= box[2] + _MARGIN
                    or box[1] >= b[3] + _MARGIN
                    or b[1] >= box[3] + _MARGIN
                    for b in boxes
                ) and (n < 3 or all(abs(cx - (b[0] + b[2]) / 2) >= _MIN_X_GAP for b in boxes)):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == n:
            return boxes
    # Not reached in 6000 worst-case trials (measured); a fixed zig-zag row is always valid.
    left = _MARGIN + max(sides) / 2
    centres: list[float] = np.linspace(left, 1 - left, n).tolist() if n > 1 else [0.5]
    return [
        [c - s / 2, _MARGIN if i % 2 == 0 else 1 - _MARGIN - s, c + s / 2, _MARGIN + s if i % 2 == 0 else 1 - _MARGIN]
        for i, (c, s) in enumerate(zip(centres, sides))
    ]


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


def generate_scene(rng: np.random.Generator, image_size: int = 64, num_objects: int = 2, noise: float = 0.5) -> Scene:
    """Draw one scene with ``num_objects`` objects; ``noise`` in [0, 1] scales the clutter."""
    s = image_size
    combos = rng.choice(len(SHAPES) * len(COLORS), size=num_objects, replace=False)
    sizes = [SIZES[i] for i in rng.integers(len(SIZES), size=num_objects)]
    sides = [float(rng.uniform(*SIZE_RANGE[z])) for z in sizes]
    boxes = _layout(rng, sides)
    objects = [
        {
            "shape": SHAPES[c // len(COLORS)],
            "color": COLORS[c % len(COLORS)],
            "size": z,
            "box": [round(v, 4) for v in box],
        }
        for c, z, box in zip(combos, sizes, boxes)
    ]
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
    for (x0, y0, x1, y1), g in zip(
        rng.uniform(0, s, size=(n_lines, 4)).tolist(), rng.integers(30, 230, size=n_lines).tolist()
    ):
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
            out[start : t + 1] = [matches[0]] * (t + 1 - start)
    return out


def named_boxes(objects: Sequence[dict]) -> list[dict]:
    """A scene's objects as the named boxes of captioning.eval.localisation (noun: shape; attributes: size, colour)."""
    return [{"box": list(o["box"]), "nouns": [o["shape"]], "attributes": [o["size"], o["color"]]} for o in objects]
