"""Seeded fuzzing of every loader that reads a file a user hands over (images: tests/data/test_images.py).

Checkpoints, exported model configs, Karpathy/COCO annotation files, caption CSV/JSONL files,
feature cache indexes and TSV parallel text are mutated a few hundred times (bytes and JSON
structure). Each mutant either loads correctly or fails with one of our messages: a
ValueError/OSError naming the file, on one line (what the CLI prints as ``error: ...``). Any
other exception is a bug this test reports with the mutant that caused it.
"""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from captioning.errors import UserError

OURS = (ValueError, OSError, UserError)
# Seeds are fixed so a failure reproduces; FUZZ_SEED=N explores other mutants (e.g. in a loop).
SEED = int(os.environ.get("FUZZ_SEED", "0"))


def _flip_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0 and out:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation
        out = out[: rng.randrange(len(out) + 1)]
    elif kind == 2 and out:  # a duplicated slice
        i, j = sorted(rng.randrange(len(out)) for _ in range(2))
        out[i:i] = out[i:j]
    else:  # random garbage inserted
        i = rng.randrange(len(out) + 1)
        out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    return bytes(out)


_ODD_VALUES = [None, 0, -1, 1.5, "", "x", "../../etc/passwd", [], {}, [1, "a"], {"a": 1}, True, 10**12]


def _mutate_json(value: Any, rng: random.Random) -> Any:
    """Replace, drop or retype one node somewhere in a JSON document."""
    value = copy.deepcopy(value)
    path = []
    node = value
    while isinstance(node, (dict, list)) and node and rng.random() < 0.75:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append((node, key))
        node = node[key]
    if not path:
        return rng.choice(_ODD_VALUES)
    parent, key = path[-1]
    if rng.random() < 0.3:
        del parent[key]
    else:
        parent[key] = rng.choice(_ODD_VALUES)
    return value


def _check(load: Callable[[Path], Any], path: Path, mutant_note: str) -> None:
    try:
        load(path)
    except OURS as err:
        message = str(err)
        assert path.name in message, f"{mutant_note}: message does not name {path.name}: {message!r}"
        assert "\n" not in message.strip(), f"{mutant_note}: message is not one line: {message!r}"
    except Exception as err:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{mutant_note}: {type(err).__name__} escaped: {err}")


def _fuzz(
    tmp_path: Path, name: str, original: bytes, load: Callable[[Path], Any], n: int, seed: int, structured: Any = None
) -> None:
    rng = random.Random(seed + 1000 * SEED)
    for k in range(n):
        path = tmp_path / f"{k:03d}" / name
        path.parent.mkdir()
        if structured is not None and k % 2 == 0:
            path.write_text(json.dumps(_mutate_json(structured, rng)))
        else:
            path.write_bytes(_flip_bytes(original, rng))
        _check(load, path, f"mutant {k} of {name} (seed {seed})")


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    from captioning.data.vocab import Vocabulary
    from captioning.models.image_captioner import ImageCaptioner
    from captioning.nn.encoders import SmallCNN

    model = ImageCaptioner(
        SmallCNN(channels=4, grid_size=2, width=2),
        Vocabulary(["a", "b"]).to_dict(),
        embed_dim=4,
        decoder_dim=4,
        attention_dim=4,
    )
    path = tmp_path_factory.mktemp("ckpt") / "m.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": {
                "_class_path": "captioning.models.image_captioner.ImageCaptioner",
                **dict(model.hparams),
            },
        },
        path,
    )
    return path.read_bytes()


def test_mutated_checkpoints_load_or_fail_with_one_line(tmp_path, checkpoint_bytes):
    from captioning.io.model_loading import load_model

    _fuzz(tmp_path, "model.ckpt", checkpoint_bytes, load_model, n=150, seed=1)


def test_mutated_checkpoint_hyper_parameters_load_or_fail_with_one_line(tmp_path, checkpoint_bytes):
    import io

    from captioning.io.model_loading import load_model

    ckpt = torch.load(io.BytesIO(checkpoint_bytes), weights_only=True)
    hparams = json.loads(json.dumps(ckpt["hyper_parameters"]))
    rng = random.Random(2 + 1000 * SEED)
    for k in range(120):
        path = tmp_path / f"{k:03d}" / "model.ckpt"
        path.parent.mkdir()
        torch.save({**ckpt, "hyper_parameters": _mutate_json(hparams, rng)}, path)
        _check(load_model, path, f"hyper-parameter mutant {k}")


def test_mutated_model_configs_load_or_fail_with_one_line(tmp_path, checkpoint_bytes):
    from captioning.io.model_folders import CONFIG_FILE, load_pretrained, model_config
    from captioning.io.model_loading import load_model

    src = tmp_path / "src.ckpt"
    src.write_bytes(checkpoint_bytes)
    config = model_config(load_model(src))
    rng = random.Random(3 + 1000 * SEED)
    good = tmp_path / "good"
    good.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in load_model(src).state_dict().items()}, str(good / "model.safetensors"))
    for k in range(100):
        folder = tmp_path / f"m{k:03d}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
        text = json.dumps(_mutate_json(config, rng)) if k % 3 else _flip_bytes(json.dumps(config).encode(), rng)
        (folder / CONFIG_FILE).write_bytes(text.encode() if isinstance(text, str) else text)
        _check(lambda p: load_pretrained(p.parent), folder / CONFIG_FILE, f"config mutant {k}")
    for k in range(30):  # damaged weights next to a good config
        folder = tmp_path / f"w{k:03d}"
        folder.mkdir()
        (folder / CONFIG_FILE).write_text(json.dumps(config))
        (folder / "model.safetensors").write_bytes(_flip_bytes((good / "model.safetensors").read_bytes(), rng))
        _check(lambda p: load_pretrained(p.parent), folder / "model.safetensors", f"weights mutant {k}")


# ----------------------------------------------------------------------------- annotation files
@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    from support.photos import write_photos

    root = tmp_path_factory.mktemp("photos")
    return root, write_photos(root)


def test_mutated_karpathy_json_loads_or_fails_with_one_line(tmp_path, photo_root):
    from captioning.data.coco import read_karpathy_json

    from support.photos import karpathy

    root, items = photo_root
    original = karpathy(tmp_path, items)
    _fuzz(
        tmp_path,
        "dataset_coco.json",
        original.read_bytes(),
        lambda p: read_karpathy_json(p, root),
        n=150,
        seed=4,
        structured=json.loads(original.read_text()),
    )


def test_mutated_coco_captions_files_load_or_fail_with_one_line(tmp_path, photo_root):
    from captioning.data.coco import read_coco_captions

    from support.photos import coco_annotations

    root, items = photo_root
    paths = coco_annotations(tmp_path, items)
    original = Path(paths["train_annotations"])
    _fuzz(
        tmp_path,
        "captions_train2014.json",
        original.read_bytes(),
        lambda p: read_coco_captions(p, root / "train2014"),
        n=150,
        seed=5,
        structured=json.loads(original.read_text()),
    )


@pytest.mark.parametrize("jsonl", [False, True], ids=["csv", "jsonl"])
def test_mutated_caption_files_load_or_fail_with_one_line(tmp_path, photo_root, jsonl):
    from captioning.data.folder import FolderCaptionsDataModule

    from support.photos import folder_csv

    root, items = photo_root
    original = folder_csv(tmp_path, items, jsonl=jsonl)
    _fuzz(
        tmp_path,
        original.name,
        original.read_bytes(),
        lambda p: FolderCaptionsDataModule(str(root), str(p), split_column="split").read_records(),
        n=100,
        seed=6,
    )


def test_mutated_feature_cache_index_loads_or_fails_with_one_line(tmp_path):
    import numpy as np

    from captioning.data.feature_cache import FeatureCache, write_feature_cache

    cache = write_feature_cache(tmp_path / "good", [1, 2, 3], np.ones((3, 2, 2, 4), dtype=np.float32))
    original = (cache.path / "index.json").read_bytes()
    rng = random.Random(7 + 1000 * SEED)
    for k in range(100):
        folder = tmp_path / f"c{k:03d}"
        folder.mkdir()
        (folder / "features.npy").write_bytes((cache.path / "features.npy").read_bytes())
        index = json.dumps(_mutate_json(json.loads(original), rng)).encode() if k % 2 else _flip_bytes(original, rng)
        (folder / "index.json").write_bytes(index)
        _check(lambda p: FeatureCache(p.parent), folder / "index.json", f"index mutant {k}")
    for k in range(40):
        folder = tmp_path / f"f{k:03d}"
        folder.mkdir()
        (folder / "index.json").write_bytes(original)
        (folder / "features.npy").write_bytes(_flip_bytes((cache.path / "features.npy").read_bytes(), rng))
        _check(lambda p: FeatureCache(p.parent).read([0, 1, 2]), folder / "features.npy", f"array mutant {k}")


def test_mutated_tsv_files_load_or_fail_with_one_line(tmp_path):
    from captioning.data.text import read_tsv

    lines = [f"je suis {w} .\ti am {w} .\tCC-BY attribution" for w in ("grand", "petit", "là", "ici", "fatigué")]
    original = ("\n".join(lines) + "\n").encode("utf-8")
    _fuzz(tmp_path, "fra.txt", original, read_tsv, n=150, seed=8)
