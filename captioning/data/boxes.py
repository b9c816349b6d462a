"""Where things are in COCO-format data: named boxes for the localisation metric.

Two sources (see :mod:`captioning.eval.localisation` for what a named box is and how it is scored):

* the COCO instances file of the same images (``instances_val2014.json``, ...): every object
  annotation's ``bbox`` ([x, y, width, height] in pixels of ``images[].width/height``) with its
  category's name. A caption names a category with many words ("man", "woman", "people" for
  *person*; "puppy" for *dog*): :data:`CATEGORY_WORDS` lists the synonyms we accept, and every
  category name itself and its plural are accepted too;
* a simple boxes JSON of your own: ``{"<image_id>": [{"word": "dog", "box": [x0, y0, x1, y1]},
  ...]}`` with boxes as fractions of the image width and height (``"words": [...]`` for
  several names of one thing, ``"attributes": ["brown", "small"]`` for the words that describe
  it, which are then scored too).

Ids are those of the caption datamodule (COCO ``images[].id`` / Karpathy ``cocoid``; the file
path for the folder route).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Caption words that name a COCO category, beyond the category's own name and its plural.
CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "person": (
        "man",
        "men",
        "woman",
        "women",
        "people",
        "persons",
        "boy",
        "boys",
        "girl",
        "girls",
        "child",
        "children",
        "kid",
        "kids",
        "guy",
        "guys",
        "lady",
        "ladies",
        "player",
        "players",
        "skier",
        "skiers",
        "surfer",
        "surfers",
        "skateboarder",
        "snowboarder",
        "baby",
        "toddler",
        "adult",
        "crowd",
        "rider",
        "gentleman",
        "couple",
    ),
    "bicycle": ("bike", "bikes", "bicycles", "cyclist"),
    "car": ("cars", "vehicle", "suv", "taxi"),
    "motorcycle": ("motorbike", "motorbikes", "motorcycles", "scooter"),
    "airplane": ("plane", "planes", "jet", "jets", "aircraft", "airliner", "airplanes"),
    "bus": ("buses", "busses"),
    "train": ("trains", "locomotive"),
    "truck": ("trucks", "pickup", "lorry"),
    "boat": ("boats", "ship", "ships", "sailboat", "canoe", "kayak"),
    "dog": ("dogs", "puppy", "puppies", "pup"),
    "cat": ("cats", "kitten", "kittens", "kitty"),
    "horse": ("horses", "pony", "foal"),
    "cow": ("cows", "cattle", "calf", "bull"),
    "sheep": ("lamb", "lambs"),
    "bird": ("birds", "seagull", "pigeon", "duck", "ducks"),
    "tv": ("television", "tvs", "monitor"),
    "laptop": ("laptops", "computer", "notebook"),
    "cell phone": ("phone", "phones", "cellphone", "smartphone"),
    "couch": ("sofa", "couches", "sofas"),
    "dining table": ("table", "tables"),
    "sports ball": ("ball", "balls", "soccer", "football", "baseball"),
    "donut": ("donuts", "doughnut", "doughnuts"),
    "hot dog": ("hotdog", "hotdogs"),
    "potted plant": ("plant", "plants"),
    "teddy bear": ("teddy", "bear"),
    "wine glass": ("glass", "glasses"),
}


def _names(category: str) -> list[str]:
    last = category.split()[-1]
    words = {category.replace(" ", ""), last, last + "s", last + "es", *CATEGORY_WORDS.get(category, ())}
    return sorted(w for w in words if w)


def _load(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {what} there")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not valid JSON ({err.__class__.__name__}: {err})") from err


def read_instances(path: str | Path) -> dict[Any, list[dict]]:
    """COCO instances file -> ``{image_id: [named box, ...]}`` (boxes as fractions)."""
    data = _load(path, "a COCO instances annotation file (instances_*.json)")
    images, anns, cats = (
        (data.get(k) for k in ("images", "annotations", "categories")) if isinstance(data, dict) else (None, None, None)
    )
    if not (isinstance(images, list) and isinstance(anns, list) and isinstance(cats, list)):
        raise ValueError(f"{path}: needs 'images', 'annotations' and 'categories' lists (COCO instances format)")
    try:
        names = {c["id"]: _names(str(c["name"]).lower()) for c in cats}
        sizes = {img["id"]: (float(img["width"]), float(img["height"])) for img in images}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: categories need id and name, images need id, width and height ({err!r})") from err
    out: dict[Any, list[dict]] = {}
    for k, ann in enumerate(anns):
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            width, height = sizes[ann["image_id"]]
            nouns = names[ann["category_id"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path} annotations[{k}]: needs bbox [x, y, w, h], a known image_id and category_id ({err!r})"
            ) from err
        if width <= 0 or height <= 0 or w < 0 or h < 0:
            raise ValueError(f"{path} annotations[{k}]: empty image or negative box size")
        box = [
            min(max(x / width, 0.0), 1.0),
            min(max(y / height, 0.0), 1.0),
            min(max((x + w) / width, 0.0), 1.0),
            min(max((y + h) / height, 0.0), 1.0),
        ]
        out.setdefault(ann["image_id"], []).append({"box": box, "nouns": nouns})
    return out


def read_boxes_json(path: str | Path) -> dict[Any, list[dict]]:
    """``{image_id: [{"word" or "words", "box": [x0, y0, x1, y1] fractions, "attributes"?}]}`` -> named boxes.

    JSON object keys are strings: an id that looks like an integer is looked up as one too.
    """
    from captioning.eval.localisation import check_boxes

    data = _load(path, "a boxes JSON ({image_id: [{word, box}]})")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object {{image_id: [{{'word', 'box'}}, ...]}}")
    out: dict[Any, list[dict]] = {}
    for key, entries in data.items():
        if not isinstance(entries, list):
            raise ValueError(f"{path}: the value of {key!r} must be a list of {{word, box}} objects")
        named = []
        for k, e in enumerate(entries):
            words = e.get("words", [e.get("word")]) if isinstance(e, dict) else None
            if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"{path} [{key!r}][{k}]: needs 'word' (text) or 'words' (list of text)")
            entry = {"box": e.get("box"), "nouns": [w.strip().lower() for w in words]}
            attributes = e.get("attributes", [])
            if not isinstance(attributes, list) or not all(isinstance(w, str) and w.strip() for w in attributes):
                raise ValueError(
                    f"{path} [{key!r}][{k}]: 'attributes' must be a list of words that describe the thing "
                    f'(e.g. ["brown", "small"]), got {attributes!r}'
                )
            if attributes:
                entry["attributes"] = [w.strip().lower() for w in attributes]
            named.append(entry)
        check_boxes(named, f"{path} [{key!r}]")
        out[key] = named
        if key.lstrip("-").isdigit():
            out[int(key)] = named
    return out
