"""Small photo-like caption datasets written by the tests, in every format users bring.

``write_photos(root)`` draws a few JPEG/PNG "photos" (a coloured object on a textured
background, different sizes and aspect ratios) with captions that describe them, then
:func:`karpathy`, :func:`coco_annotations` and :func:`folder_csv` write the same data as a
Karpathy split json, official COCO ``captions_*.json`` files, and a folder + CSV/JSONL file.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (210, 40, 40), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
THINGS = ("ball", "box")
GROUNDS = {"grass": (60, 150, 60), "sand": (200, 180, 130)}
SPLIT_OF = ["train"] * 9 + ["val"] * 2 + ["test"] * 2
SIZES = [(96, 64), (64, 96), (80, 80), (120, 90)]


@dataclass
class Photo:
    index: int
    file: str  # relative to the image root, e.g. "train2014/img_003.jpg"
    split: str
    captions: list[str]
    cocoid: int


def write_photos(root: Path, seed: int = 0) -> list[Photo]:
    """13 photos under ``root`` (9 train, 2 val, 2 test) with 3 captions each."""
    rng = np.random.default_rng(seed)
    photos = []
    for i, split in enumerate(SPLIT_OF):
        colour = list(COLOURS)[i % 3]
        thing = THINGS[(i // 3) % 2]
        ground = list(GROUNDS)[i % 2]
        w, h = SIZES[i % len(SIZES)]
        pixels = np.clip(np.array(GROUNDS[ground]) + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        box = [w * 0.3, h * 0.3, w * 0.7, h * 0.7]
        (draw.ellipse if thing == "ball" else draw.rectangle)(box, fill=COLOURS[colour])
        folder = "val2014" if split == "val" else "train2014"
        ext = ".png" if i % 4 == 3 else ".jpg"
        file = f"{folder}/img_{i:03d}{ext}"
        (root / folder).mkdir(parents=True, exist_ok=True)
        image.save(root / file)
        captions = [
            f"A {colour} {thing} on the {ground}.",
            f"a {thing} that is {colour}",
            f"{colour} {thing} lying on {ground}",
        ]
        photos.append(Photo(i, file, split, captions, 5000 + i))
    return photos


def karpathy(root: Path, photos: list[Photo], name: str = "dataset_coco.json", coco_style: bool = True) -> Path:
    """A Karpathy split json (COCO layout: filepath + filename + cocoid; Flickr: filename + imgid)."""
    images = []
    for p in photos:
        folder, filename = p.file.split("/")
        entry = {
            "filename": filename if coco_style else p.file,
            "imgid": p.index,
            "split": "restval" if (p.split == "train" and p.index == 0) else p.split,
            "sentences": [{"raw": c, "tokens": c.lower().rstrip(".").split()} for c in p.captions],
        }
        if coco_style:
            entry.update(filepath=folder, cocoid=p.cocoid)
        images.append(entry)
    path = root / name
    path.write_text(json.dumps({"images": images, "dataset": "coco" if coco_style else "flickr8k"}))
    return path


def coco_annotations(root: Path, photos: list[Photo]) -> dict[str, str]:
    """Official ``captions_{train,val}2014.json`` files; returns the datamodule's path arguments."""
    out = {}
    for split, folder in (("train", "train2014"), ("val", "val2014")):
        chosen = [p for p in photos if (p.split == "val") == (split == "val")]
        images = [{"id": p.cocoid, "file_name": p.file.split("/")[1], "width": 1, "height": 1} for p in chosen]
        anns = [
            {"id": p.cocoid * 10 + j, "image_id": p.cocoid, "caption": c}
            for p in chosen
            for j, c in enumerate(p.captions)
        ]
        path = root / "annotations" / f"captions_{folder}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
        out[f"{split}_annotations"] = str(path)
        out[f"{split}_images"] = str(root / folder)
    return out


def folder_csv(root: Path, photos: list[Photo], with_split: bool = True, jsonl: bool = False) -> Path:
    """A captions file for the folder route: one row per caption, file relative to ``root``."""
    rows = [
        {"file": p.file, "caption": c, **({"split": p.split} if with_split else {})} for p in photos for c in p.captions
    ]
    if jsonl:
        path = root / "captions.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    path = root / "captions.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header declares side x side pixels (400 megapixels by default) in ~150 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )
    return path
