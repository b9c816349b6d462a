"""Handwritten-digit scenes through the COCO-annotations route: does attention still beat its absence?

Writes a caption set of 64-px scenes with 1-3 handwritten digits of two sizes ("a small 3 to the
left of a large 7") as official-COCO-style files (``captions_<split>.json``, one image folder
per split) with a boxes JSON for the localisation metric (each digit's box, its size word as an
attribute), then trains each variant through the documented command line
(``captioning fit --config configs/coco_annotations.yaml`` with the SmallCNN encoder trained from
scratch, ``--test_after_fit``) on the same time budget, captions the test scenes with each
run's best model (beam 3, the model's decoding settings; ``shipped_no_block`` decodes the shipped
run's model without the repetition block) and writes one table: BLEU-4, CIDEr-D, digit-sequence
accuracy (the caption names the scene's digits left to right), digits and sizes both right, the
pointing game for all described words, the digits alone and the size words alone, and the share
of captions that repeat a three-word group.

The glyphs are scikit-learn's 1,797 handwritten digits (8x8, shipped inside the package: no
download; ``pip install scikit-learn``). Scenes of the train split draw from the first 1,400
glyphs, val and test scenes from the other 397, so test digits are handwriting the model never
saw.

    python benchmarks/digit_scenes.py --work_dir runs/digit_scenes --minutes 9 \\
        --json benchmarks/results/digit_scenes.json --results_md docs/results.md

A variant whose run folder holds a finished run (``<work_dir>/<name>.done``) is not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from real_photos import repeats_trigram, run_once, write_results_md  # a sibling script (benchmarks/)

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- digit-scenes:begin -->", "<!-- digit-scenes:end -->"
SIDE = 64  # scene side in pixels, the SmallCNN input
SIZES = {"small": (0.19, 0.23), "large": (0.34, 0.40)}  # glyph side as a fraction of the scene
TRAIN_GLYPHS = 1400  # glyphs [0, 1400) draw training scenes, the rest val/test scenes
TEMPLATES = {
    1: ("a {0}", "there is a {0}", "a single {0}", "an image with a {0}", "one {0} on its own"),
    2: (
        "a {0} to the left of a {1}",
        "a {0} on the left and a {1} on the right",
        "there is a {0} left of a {1}",
        "two digits a {0} and a {1} from left to right",
        "a {0} next to a {1}",
    ),
    3: (
        "a {0} , a {1} and a {2} from left to right",
        "from left to right a {0} , a {1} and a {2}",
        "a {0} on the left , a {1} in the middle and a {2} on the right",
        "three digits a {0} then a {1} then a {2}",
        "three digits in a row a {0} , a {1} and a {2}",
    ),
}

#: name -> extra fit arguments on top of configs/coco_annotations.yaml with the SmallCNN encoder.
VARIANTS: dict[str, list[str]] = {
    "shipped": [],  # the photo config as shipped: query previous, alpha_c 1, sentinel, n = 3 block
    "no_sentinel": ["--model.init_args.sentinel", "false"],
    "current_query": [
        "--model.init_args.query", "current", "--model.init_args.alpha_c", "0.0",
        "--model.init_args.sentinel", "false",
    ],
    "encoder_lr_1e-4": ["--model.init_args.encoder_lr", "0.0001"],  # the config's former value
    "no_attention": ["--model.init_args.attention", "none", "--model.init_args.sentinel", "false"],
    "no_attention_encoder_lr_1e-4": [
        "--model.init_args.attention", "none", "--model.init_args.sentinel", "false",
        "--model.init_args.encoder_lr", "0.0001",
    ],
    # The seed spread: the same two decoders again from other initial weights and batch order.
    "shipped_seed1": ["--seed_everything", "1"],
    "no_sentinel_seed1": ["--seed_everything", "1", "--model.init_args.sentinel", "false"],
}  # fmt: skip
#: name -> (the run whose model it decodes, decoding settings that differ): rows without training.
DECODING_ONLY: dict[str, tuple[str, dict]] = {"shipped_no_block": ("shipped", {"no_repeat_ngram": 0})}


# ---------------------------------------------------------------------------- the scenes
def load_glyphs() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: (N, 8, 8) ink in [0, 1] and (N,) labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("the digit glyphs come with scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def draw_scene(
    rng: np.random.Generator, glyphs: np.ndarray, labels: np.ndarray, pool: np.ndarray
) -> tuple[Image.Image, list[dict]]:
    """One scene from the glyphs whose indices ``pool`` holds: 1-3 different digits, no overlap,
    left-to-right order visible. Returns the image and its digits left to right, each
    {"digit", "size", "box" (fractions of the side), "glyph" (index into ``glyphs``)}."""
    count = int(rng.integers(1, 4))
    while True:
        picks = rng.choice(pool, size=count, replace=False)
        if len(set(labels[picks].tolist())) == count:
            break
    objects: list[dict] = []
    for p in picks:
        size = "small" if rng.random() < 0.5 else "large"
        side = rng.uniform(*SIZES[size])
        for _ in range(200):  # rejection: inside the scene, no overlap, centres 0.1 apart in x
            x0, y0 = rng.uniform(0.02, 0.98 - side, size=2)
            box = (x0, y0, x0 + side, y0 + side)
            clear = all(
                box[2] + 0.02 <= o["box"][0] or o["box"][2] + 0.02 <= box[0]
                or box[3] + 0.02 <= o["box"][1] or o["box"][3] + 0.02 <= box[1]
                for o in objects
            )  # fmt: skip
            if clear and all(abs((box[0] + box[2]) / 2 - (o["box"][0] + o["box"][2]) / 2) >= 0.1 for o in objects):
                objects.append({"digit": int(labels[p]), "size": size, "box": box, "glyph": int(p)})
                break
        else:
            return draw_scene(rng, glyphs, labels, pool)  # crowded: draw again
    canvas = np.full((SIDE, SIDE), rng.uniform(20, 90), dtype=np.float32)
    canvas += rng.normal(0, 10, size=canvas.shape).astype(np.float32)
    ink = rng.uniform(190, 250)
    for o in objects:
        x0, y0, x1, y1 = (round(v * SIDE) for v in o["box"])
        glyph = Image.fromarray((glyphs[o["glyph"]] * 255).astype(np.uint8)).resize((x1 - x0, y1 - y0), Image.BILINEAR)
        alpha = np.asarray(glyph, dtype=np.float32) / 255.0
        canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - alpha) + ink * alpha
    objects.sort(key=lambda o: o["box"][0] + o["box"][2])
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).convert("RGB")
    return image, objects


def references(objects: list[dict]) -> list[str]:
    """The scene's five reference captions."""
    phrases = [f"{o['size']} {o['digit']}" for o in objects]
    return [t.format(*phrases) for t in TEMPLATES[len(objects)]]


def write_split(
    out: Path,
    split: str,
    count: int,
    seed: int,
    glyphs: np.ndarray,
    labels: np.ndarray,
    pool: np.ndarray,
    first_id: int = 1,
) -> tuple[dict, dict]:
    """Write ``count`` scenes of one split: images under ``out/split`` and ``captions_<split>.json``
    in the official COCO layout. Returns ({image_id: objects}, the boxes JSON of the localisation
    metric for these images)."""
    rng = np.random.default_rng(seed)
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations, boxes, truth = [], [], {}, {}
    for image_id in range(first_id, first_id + count):
        image, objects = draw_scene(rng, glyphs, labels, pool)
        name = f"{split}_{image_id:06d}.png"
        image.save(folder / name)
        images.append({"id": image_id, "file_name": name, "width": SIDE, "height": SIDE})
        for caption in references(objects):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
        boxes[str(image_id)] = [
            {"word": str(o["digit"]), "box": list(o["box"]), "attributes": [o["size"]]} for o in objects
        ]
        truth[image_id] = objects
    (out / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return truth, boxes


def write_scenes(out: Path, train: int, val: int, test: int, glyphs: np.ndarray, labels: np.ndarray) -> dict:
    """The three splits (image ids 1..., 100001..., 200001...) and ``boxes.json`` for val and
    test; train scenes use the first TRAIN_GLYPHS glyphs, val and test scenes only the others.
    Returns {split: {image_id: objects}}."""
    seen, unseen = np.arange(TRAIN_GLYPHS), np.arange(TRAIN_GLYPHS, len(glyphs))
    truth, boxes = {}, {}
    for k, (split, count, pool) in enumerate((("train", train, seen), ("val", val, unseen), ("test", test, unseen))):
        truth[split], split_boxes = write_split(out, split, count, k, glyphs, labels, pool, 1 + 100_000 * k)
        if split != "train":
            boxes.update(split_boxes)
    (out / "boxes.json").write_text(json.dumps(boxes))
    return truth


# ---------------------------------------------------------------------------- scoring
def read_scene(caption: str) -> list[tuple[str | None, int]]:
    """(size word or None, digit) of each digit a caption names, in the order it names them."""
    words = caption.split()
    return [
        (words[i - 1] if i > 0 and words[i - 1] in SIZES else None, int(w))
        for i, w in enumerate(words)
        if re.fullmatch(r"[0-9]", w)
    ]


def digit_accuracy(captions: dict, truth: dict) -> dict[str, float]:
    """Share of scenes whose caption names exactly their digits left to right, and with each
    digit's size right too."""
    digits = sizes = 0
    for image_id, objects in truth.items():
        named = read_scene(captions[image_id])
        digits += [d for _, d in named] == [o["digit"] for o in objects]
        sizes += named == [(o["size"], o["digit"]) for o in objects]
    return {"digit_accuracy": digits / len(truth), "digit_and_size_accuracy": sizes / len(truth)}


# ---------------------------------------------------------------------------- training
def fit_command(args: argparse.Namespace, name: str) -> list[str]:
    data, run = Path(args.work_dir) / "data", Path(args.work_dir) / name
    enc, d = "--model.init_args.encoder.", "--data.init_args."
    minutes = args.minutes
    return [
        sys.executable, "-m", "captioning", "fit", "--config", str(ROOT / "configs/coco_annotations.yaml"),
        enc + "class_path", "captioning.nn.encoders.SmallCNN",
        enc + "init_args.image_size", str(SIDE),
        "--test_after_fit", "true",
        "--trainer.default_root_dir", str(run),
        "--trainer.max_time", f"00:{minutes // 60:02d}:{minutes % 60:02d}:00",
        "--trainer.max_epochs", str(args.max_epochs),
        d + "train_annotations", str(data / "captions_train.json"),
        d + "val_annotations", str(data / "captions_val.json"),
        d + "test_annotations", str(data / "captions_test.json"),
        d + "train_images", str(data / "train"),
        d + "val_images", str(data / "val"),
        d + "test_images", str(data / "test"),
        d + "boxes_file", str(data / "boxes.json"),
        d + "vocab_path", str(run / "vocab.json"),
        *VARIANTS[name],
    ]  # fmt: skip


def train(args: argparse.Namespace, name: str) -> None:
    run_once(Path(args.work_dir), name, fit_command(args, name))


def evaluate(args: argparse.Namespace, name: str, truth: dict) -> dict:
    """Caption the test scenes with the run's best model (for a DECODING_ONLY row: another
    run's model decoded differently) and score them: COCO metrics against the five references,
    digit accuracy, and the pointing game over the digits' boxes (all described words, digits,
    size words; none without attention)."""
    from captioning.eval.metrics import caption_scores
    from captioning.io.model_loading import load_model
    from captioning.models.inference import caption_images

    run_name, decoding = DECODING_ONLY.get(name, (name, {}))
    model = load_model(Path(args.work_dir) / run_name).eval()
    for key, value in decoding.items():
        model.hparams[key] = value
    ids = sorted(truth)
    folder = Path(args.work_dir) / "data" / "test"
    captions, words, attention = {}, [], []
    for k in range(0, len(ids), 100):
        batch = [Image.open(folder / f"test_{i:06d}.png").convert("RGB") for i in ids[k : k + 100]]
        for i, c in zip(ids[k : k + 100], caption_images(model, batch)):
            captions[i] = c.text
            words.append(c.words)
            attention.append(c.attention)
    scores = caption_scores(captions, {i: references(truth[i]) for i in ids})
    row: dict = {"variant": name, "bleu4": scores["bleu4"], "cider": scores["cider"]}
    row.update(digit_accuracy(captions, truth))
    if model.hparams.attention != "none":  # a uniform map has no peak to score
        row.update(localisation(words, attention, [truth[i] for i in ids]))
    row["repeated_trigram_share"] = sum(map(repeats_trigram, captions.values())) / len(ids)
    row["train_seconds"] = (Path(args.work_dir) / f"{run_name}.done").read_text().strip()
    row["examples"] = {i: captions[i] for i in ids[:5]}
    return row


def localisation(words: list, attention: list, scenes: list) -> dict[str, float | None]:
    """The project's pointing game over each scene's digit boxes: every described word, the
    digits alone, and the size words alone ("small" in "a small 3": is its peak on the 3?;
    None when no caption has one)."""
    from captioning.eval.localisation import pointing_game

    boxes = [[{"nouns": [str(o["digit"])], "box": o["box"], "attributes": [o["size"]]} for o in s] for s in scenes]
    game = pointing_game(words, attention, boxes)
    sizes = game["localisation_total"] - game["localisation_nouns_total"]
    return {
        "localisation": game["localisation"],
        "localisation_digits": game["localisation_nouns"],
        "localisation_sizes": (game["localisation_hits"] - game["localisation_nouns_hits"]) / sizes if sizes else None,
    }


def table(rows: list[dict], counts: dict[str, int], args: argparse.Namespace, machine: str) -> str:
    def f(row: dict, key: str) -> str:
        return f"{row[key]:.3f}" if row.get(key) is not None else "n/a"

    lines = [
        BEGIN,
        f"{counts['train']:,} training, {counts['val']} validation and {counts['test']} test scenes "
        "(64 px, 1-3 handwritten digits of two sizes; test digits in handwriting never seen in training); "
        "`configs/coco_annotations.yaml` with the SmallCNN encoder trained from scratch, "
        f"{args.minutes} min per variant, test after fit on the best validation CIDEr-D; {machine}. "
        "`benchmarks/digit_scenes.py` writes this table.",
        "",
        "| variant | BLEU-4 | CIDEr-D | digit sequence right | digits and sizes right | localisation "
        "| localisation, digits | size words | repeated trigrams |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {f(r, 'bleu4')} | {f(r, 'cider')} | {f(r, 'digit_accuracy')} | "
            f"{f(r, 'digit_and_size_accuracy')} | {f(r, 'localisation')} | {f(r, 'localisation_digits')} | "
            f"{f(r, 'localisation_sizes')} | {100 * r['repeated_trigram_share']:.1f}% |"
        )
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work_dir", default="runs/digit_scenes")
    p.add_argument("--train", type=int, default=4000, help="training scenes")
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--minutes", type=int, default=9, help="training budget per variant")
    p.add_argument(
        "--max_epochs", type=int, default=1000, help="an epoch limit as well (the budget decides by default)"
    )
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--results_md", default=None, help="put the table into this Markdown file")
    p.add_argument("--machine", default=None, help="the machine, named in the table")
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS and v not in DECODING_ONLY]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {[*VARIANTS, *DECODING_ONLY]}")
    data = Path(args.work_dir) / "data"
    truth_file = data / "truth.json"
    if not truth_file.exists():
        truth = write_scenes(data, args.train, args.val, args.test, *load_glyphs())
        truth_file.write_text(json.dumps({s: {str(k): v for k, v in t.items()} for s, t in truth.items()}))
    written = json.loads(truth_file.read_text())  # the scenes on disk, whatever --train/--val/--test say now
    counts = {split: len(scenes) for split, scenes in written.items()}
    truth = {int(k): v for k, v in written["test"].items()}
    for name in dict.fromkeys(DECODING_ONLY.get(n, (n,))[0] for n in names):
        train(args, name)
    rows = [evaluate(args, name, truth) for name in names]
    machine = args.machine or f"{os.cpu_count()}-core CPU"
    block = table(rows, counts, args, machine)
    print(block)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "machine": machine}, indent=1))
    if args.results_md:
        write_results_md(Path(args.results_md), block, "Handwritten-digit scenes")


if __name__ == "__main__":
    main()
