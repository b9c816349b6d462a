"""Every shipped config's data route, on photos the test writes: fit 2 steps + validate through
``captioning fit --config configs/<route>.yaml`` (tiny backbone, random weights), then caption a
raw photo from the checkpoint in a fresh process (overlay PNG + JSON)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.commands.main import main

from support import ROOT
from support.cli import cli_command, cli_env
from support.photos import coco_annotations, folder_csv, karpathy, write_photos

pytestmark = pytest.mark.e2e  # end to end: CLI subprocesses (run with -m e2e)

TINY_MODEL = [
    "--model.init_args.embed_dim",
    "16",
    "--model.init_args.decoder_dim",
    "32",
    "--model.init_args.attention_dim",
    "16",
    "--model.init_args.beam_size",
    "2",
    "--model.init_args.max_length",
    "8",
    "--model.init_args.scheduler",
    "none",
]
TINY_RESNET = [
    "--model.init_args.encoder.init_args.backbone",
    "resnet18",
    "--model.init_args.encoder.init_args.weights",
    "null",
    "--model.init_args.encoder.init_args.grid_size",
    "2",
    "--model.init_args.encoder.init_args.image_size",
    "64",
]


def _trainer(run: Path) -> list[str]:
    return [
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.default_root_dir",
        str(run),
        "--trainer.accelerator",
        "cpu",
    ]


def _data(prefix: str, run: Path) -> list[str]:
    return [
        f"{prefix}.batch_size",
        "4",
        f"{prefix}.num_workers",
        "0",
        f"{prefix}.min_count",
        "1",
        f"{prefix}.vocab_path",
        str(run / "vocab.json"),
    ]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    return root, write_photos(root)


def _fit(config: str, run: Path, *extra: str) -> Path:
    main(["fit", "--config", str(ROOT / "configs" / config), *_trainer(run), *TINY_MODEL, *extra])
    best = sorted(run.rglob("best*.ckpt"))
    assert best, f"{config}: no best checkpoint under {run}"
    ckpt = torch.load(best[-1], map_location="cpu", weights_only=True)
    assert "val/cider" in ckpt["captioning"]["scores"]  # validation ran by real decoding
    return best[-1]


def _caption_in_fresh_process(tmp: Path, ckpt: Path, image: Path, *extra: str) -> dict:
    out = tmp / "overlays"
    done = subprocess.run(
        cli_command("caption", "--ckpt_path", str(ckpt), "--output", str(out), str(image), "--format", "jsonl", *extra),
        env=cli_env(tmp),
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["image"] == str(image) and record["caption"]
    meta = json.loads(Path(record["json"]).read_text())
    assert len(meta["attention"]) == len(meta["words"]) == len(record["caption"].split())
    with Image.open(record["overlay"]) as png:
        assert png.width > 64 and png.height > 64
    return meta


def _new_photo(tmp: Path) -> Path:
    """A photo none of the routes trained on (odd size, RGBA PNG)."""
    path = tmp / "new photo.png"
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 255, (70, 110, 4), dtype=np.uint8), "RGBA").save(path)
    return path


def test_karpathy_json_route_coco_yaml(photos, tmp_path):
    root, items = photos
    run = tmp_path / "run"
    ckpt = _fit(
        "coco.yaml",
        run,
        *TINY_RESNET,
        "--data.init_args.karpathy_json",
        str(karpathy(root, items)),
        "--data.init_args.image_root",
        str(root),
        *_data("--data.init_args", run),
    )
    meta = _caption_in_fresh_process(tmp_path, ckpt, _new_photo(tmp_path))
    assert meta["grid_size"] == [2, 2]


def test_flickr_layout_route_flickr8k_yaml(photos, tmp_path):
    root, items = photos
    run = tmp_path / "run"
    ckpt = _fit(
        "flickr8k.yaml",
        run,
        *TINY_RESNET,
        "--data.init_args.karpathy_json",
        str(karpathy(root, items, "dataset_flickr8k.json", coco_style=False)),
        "--data.init_args.image_root",
        str(root),
        *_data("--data.init_args", run),
    )
    _caption_in_fresh_process(tmp_path, ckpt, root / items[-1].file)


def test_official_annotation_files_route_coco_annotations_yaml(photos, tmp_path):
    root, items = photos
    run = tmp_path / "run"
    args = [a for k, v in coco_annotations(root, items).items() for a in (f"--data.init_args.{k}", v)]
    ckpt = _fit("coco_annotations.yaml", run, *TINY_RESNET, *args, *_data("--data.init_args", run))
    _caption_in_fresh_process(tmp_path, ckpt, _new_photo(tmp_path))


@pytest.mark.parametrize("split_column", [True, False], ids=["split-column", "seeded-split"])
def test_folder_and_csv_route_custom_folder_yaml(photos, tmp_path, split_column):
    root, items = photos
    run = tmp_path / "run"
    captions = folder_csv(tmp_path, items, with_split=split_column, jsonl=not split_column)
    ckpt = _fit(
        "custom_folder.yaml",
        run,
        *TINY_RESNET,
        "--data.init_args.image_dir",
        str(root),
        "--data.init_args.captions_file",
        str(captions),
        "--data.init_args.split_column",
        "split" if split_column else "null",
        "--data.init_args.val_fraction",
        "0.2",
        *_data("--data.init_args", run),
    )
    # The overlay callback drew where the model looked, for validation images, into the run folder.
    assert list(run.rglob("val_attention/*/*.png"))
    _caption_in_fresh_process(tmp_path, ckpt, _new_photo(tmp_path))


def test_cached_features_route_coco_cached_yaml(photos, tmp_path):
    root, items = photos
    run = tmp_path / "run"
    ckpt = _fit(
        "coco_cached.yaml",
        run,
        *TINY_RESNET,
        "--data.init_args.cache_dir",
        str(tmp_path / "cache"),
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.data.init_args.karpathy_json",
        str(karpathy(root, items)),
        "--data.init_args.data.init_args.image_root",
        str(root),
        # a null two class levels deep must arrive as None, not the string 'None'
        "--data.init_args.data.init_args.train_annotations",
        "null",
        *_data("--data.init_args.data.init_args", run),
    )
    assert (tmp_path / "cache" / "train" / "features.npy").is_file()
    _caption_in_fresh_process(tmp_path, ckpt, _new_photo(tmp_path))


def test_external_features_route_then_attached_extractor_captions_photos(photos, tmp_path):
    """Features made elsewhere (written in the documented cache format, Karpathy cocoid as row ids)
    train a model from configs/features_external.yaml alone; it refuses photos until the real
    extractor is attached, and then captions them with exactly the features it trained on."""
    from captioning.data.feature_cache import write_feature_cache
    from captioning.data.images import image_tensor, load_image
    from captioning.nn.torchvision_encoder import ImageEncoder

    root, items = photos
    torch.manual_seed(3)
    extractor = ImageEncoder("resnet18", weights=None, grid_size=2, image_size=64).eval()
    weights = tmp_path / "my_resnet18.pth"
    torch.save(extractor.backbone.state_dict(), weights)  # the "external" extractor's weights file
    for split in ("train", "val", "test"):
        chosen = [p for p in items if p.split == split]
        batch = torch.stack([image_tensor(load_image(root / p.file), 64) for p in chosen])
        with torch.no_grad():
            feats = extractor(batch).view(len(chosen), 2, 2, 512)
        write_feature_cache(tmp_path / "features" / split, [p.cocoid for p in chosen], feats)

    run = tmp_path / "run"
    pre = "--model.init_args.encoder.init_args"
    features_route = [
        f"{pre}.grid_size",
        "2",
        f"{pre}.channels",
        "512",
        f"{pre}.image_size",
        "64",
        "--data.init_args.cache_dir",
        str(tmp_path / "features"),
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.data.init_args.karpathy_json",
        str(karpathy(root, items)),
        "--data.init_args.data.init_args.image_root",
        str(root),
        *_data("--data.init_args.data.init_args", run),  # the SCST run below reuses this vocab.json
    ]
    ckpt = _fit("features_external.yaml", run, *features_route)

    # Self-critical training on top, from the shipped config, starting from that run (same vocabulary).
    scst_run = tmp_path / "scst"
    scst_ckpt = _fit(
        "features_external.yaml",
        scst_run,
        "--config",
        str(ROOT / "configs" / "scst.yaml"),
        "--model.init_args.init_from",
        str(run),
        "--model.init_args.scst_samples",
        "3",
        "--data.init_args.captions_per_epoch",
        "one",
        *features_route,
    )
    metrics = next(scst_run.rglob("metrics.csv")).read_text().splitlines()[0]
    assert "train/reward" in metrics and "train/sample_diversity" in metrics and "test/cider" in metrics
    scst_hparams = torch.load(scst_ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert scst_hparams["self_critical"] and scst_hparams["init_from"] == str(run)

    photo = _new_photo(tmp_path)
    refused = subprocess.run(
        cli_command("caption", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "o"), str(photo)),
        env=cli_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2 and "attach-encoder" in refused.stderr and "Traceback" not in refused.stderr

    spec = tmp_path / "my_extractor.yaml"
    spec.write_text(
        f"class_path: captioning.nn.torchvision_encoder.ImageEncoder\ninit_args:\n  backbone: resnet18\n"
        f"  weights: null\n  weights_path: {weights}\n  grid_size: 2\n  image_size: 64\n"
    )
    attached = tmp_path / "captioner.ckpt"
    assert main(["attach-encoder", "--ckpt_path", str(ckpt), "--encoder", str(spec), "--output", str(attached)]) == 0
    assert (
        main(["attach-encoder", "--ckpt_path", str(ckpt), "--encoder", str(spec), "--output", str(attached)]) == 2
    )  # never overwrites
    _caption_in_fresh_process(tmp_path, attached, photo)

    from captioning.io.model_loading import load_model

    model = load_model(attached)
    first = next(p for p in items if p.split == "train")
    with torch.no_grad():
        again = model.encoder(image_tensor(load_image(root / first.file), 64)[None]).view(2, 2, 512)
    cached = np.load(tmp_path / "features" / "train" / "features.npy")[0].astype(np.float32)
    assert np.allclose(again.numpy(), cached, rtol=1e-2, atol=1e-2)  # float16 cache


def test_attaching_an_extractor_of_the_wrong_size_is_refused(tmp_path, capsys):
    from captioning.data.vocab import Vocabulary
    from captioning.models.image_captioner import ImageCaptioner
    from captioning.nn.encoders import PrecomputedFeatures

    model = ImageCaptioner(
        PrecomputedFeatures(grid_size=7, channels=1280),
        Vocabulary(["a", "b"]).to_dict(),
        embed_dim=8,
        decoder_dim=8,
        attention_dim=8,
    )
    ckpt = tmp_path / "f.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": {
                "_class_path": "captioning.models.image_captioner.ImageCaptioner",
                **dict(model.hparams),
            },
        },
        ckpt,
    )
    spec = tmp_path / "enc.yaml"
    spec.write_text(
        "class_path: captioning.nn.torchvision_encoder.ImageEncoder\ninit_args: {backbone: resnet18, weights: null, "
        "grid_size: 2}\n"
    )
    assert (
        main(
            ["attach-encoder", "--ckpt_path", str(ckpt), "--encoder", str(spec), "--output", str(tmp_path / "out.ckpt")]
        )
        == 2
    )
    assert "2x2x512 features, the model was trained on 7x7x1280" in capsys.readouterr().err
    assert not (tmp_path / "out.ckpt").exists()
