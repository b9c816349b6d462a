"""Shareable models: export a checkpoint, caption with the folder (or a Hub repo from the cache),
push with a fake Hub API; nothing is unpickled and no network is touched."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioning.commands.main import main
from captioning.io.model_folders import CONFIG_FILE, WEIGHTS_FILE, load_pretrained, push_model

from support.cli import cli_command, cli_env


@pytest.fixture(scope="module")
def exported(shapes_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "shapes-captioner"
    assert main(["export", "--ckpt_path", str(shapes_run), "--output", str(out), "--name", "me/shapes-captioner"]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from captioning.data.shapes import ShapesDataModule

    return ShapesDataModule().export_images("test", [0, 1, 2], tmp_path_factory.mktemp("imgs"))


def test_export_writes_a_self_contained_model_folder(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "example.png", "example.json"} <= names
    config = json.loads((exported / CONFIG_FILE).read_text())
    assert config["class_path"] == "captioning.models.image_captioner.ImageCaptioner"
    assert config["init_args"]["encoder"]["class_path"] == "captioning.nn.encoders.SmallCNN"
    assert config["init_args"]["vocab"]["itos"][:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert config["preprocessing"] == {"image_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    training = config["training"]
    assert "val/cider" in training["scores"] and "shapes" in training["data"]
    card = (exported / "README.md").read_text()
    assert "![attention overlay](example.png)" in card and "val/cider" in card
    assert "captioning caption --model me/shapes-captioner" in card
    example = json.loads((exported / "example.json").read_text())
    assert len(example["words"]) == len(example["attention"]) and example["references"]
    with Image.open(exported / "example.png") as png:
        assert png.width > 64


def test_export_never_overwrites_a_folder(shapes_run, exported, capsys):
    before = (exported / CONFIG_FILE).read_bytes()
    assert main(["export", "--ckpt_path", str(shapes_run), "--output", str(exported)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (exported / CONFIG_FILE).read_bytes() == before


def test_model_folder_captions_exactly_like_the_checkpoint(shapes_run, exported, images, tmp_path):
    outputs = {}
    for source in (["--ckpt_path", str(shapes_run)], ["--model", str(exported)]):
        out = tmp_path / source[0].strip("-")
        assert main(["caption", *source, "--output", str(out), "--format", "jsonl", *map(str, images)]) == 0
        outputs[source[0]] = {p.name: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    a, b = outputs["--ckpt_path"], outputs["--model"]
    assert a.keys() == b.keys() and len(a) == 3
    for name in a:
        assert a[name]["caption"] == b[name]["caption"]
        assert a[name]["attention"] == b[name]["attention"]  # identical on CPU


def test_load_pretrained_reads_safetensors_and_config_only(exported, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    model = load_pretrained(exported)
    assert not model.training and model.encoder.preprocessing.image_size == 64
    assert "val/cider" in model.checkpoint_info["scores"]


def test_a_folder_naming_a_function_or_foreign_class_is_refused(exported, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    config = json.loads((bad / CONFIG_FILE).read_text())
    config["class_path"] = "captioning.data.feature_cache.write_feature_cache"
    (bad / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="only these are built"):
        load_pretrained(bad)
    config["class_path"] = "os.system"
    (bad / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--trust_module os"):
        load_pretrained(bad)


def _hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """The layout huggingface_hub's cache uses: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


@pytest.mark.e2e
def test_caption_with_a_hub_repo_id_from_the_cache_offline(exported, images, tmp_path):
    cache = _hub_cache(tmp_path / "hub", "me/shapes-captioner", exported)
    env = cli_env(tmp_path, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        cli_command("caption", "--model", "me/shapes-captioner", "--no_overlays", str(images[0])),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(str(images[0]) + "\t") and len(done.stdout.split("\t")[1].split()) >= 1
    missing = subprocess.run(
        cli_command("caption", "--model", "me/not-cached", "--no_overlays", str(images[0])),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "me/not-cached is not in the Hugging Face cache" in missing.stderr and str(cache) in missing.stderr


class FakeHubApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/me/x/commit/1"})()


def test_push_creates_the_repo_and_uploads_the_folder(exported, capsys):
    api = FakeHubApi()
    from captioning.commands.push import main as push_main

    assert push_main(["--model", str(exported), "--repo_id", "me/shapes-captioner", "--private"], api=api) == 0
    (name1, create), (name2, upload) = api.calls
    assert name1 == "create_repo" and create == {
        "repo_id": "me/shapes-captioner",
        "repo_type": "model",
        "private": True,
        "exist_ok": True,
    }
    assert name2 == "upload_folder" and upload["folder_path"] == str(exported)
    assert upload["repo_id"] == "me/shapes-captioner"
    assert "uploaded" in capsys.readouterr().err


def test_push_refuses_what_is_not_a_model_folder(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        push_model(tmp_path / "x", "me/x", api=FakeHubApi())
    with pytest.raises(ValueError, match="owner/name"):
        push_model(_copy_config_only(tmp_path), "not a repo id", api=FakeHubApi())


def _copy_config_only(tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(
        json.dumps({"format": "attention-captioning/1", "class_path": "x.Y", "init_args": {}})
    )
    (folder / WEIGHTS_FILE).write_bytes(b"")
    return folder


def test_folders_and_checkpoints_written_before_the_decoder_core_still_load(shapes_run, exported, tmp_path):
    """Earlier versions named the LSTM's context weights ``input_context`` (``input_feed`` with the
    current-state query); such model folders and checkpoints load into ``input_extra``."""
    from safetensors.torch import load_file, save_file

    from captioning.io.model_loading import find_checkpoint, load_model

    old = tmp_path / "old-folder"
    old.mkdir()
    for f in exported.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    state = load_file(str(exported / WEIGHTS_FILE))
    state["decoder.input_feed.weight"] = state.pop("decoder.input_extra.weight")  # the quickstart: query current
    save_file(state, str(old / WEIGHTS_FILE))
    new, legacy = load_pretrained(exported), load_pretrained(old)
    torch.testing.assert_close(legacy.decoder.input_extra.weight, new.decoder.input_extra.weight)
    ckpt = torch.load(find_checkpoint(shapes_run), weights_only=True)
    ckpt["state_dict"]["decoder.input_feed.weight"] = ckpt["state_dict"].pop("decoder.input_extra.weight")
    torch.save(ckpt, tmp_path / "old.ckpt")
    torch.testing.assert_close(
        load_model(tmp_path / "old.ckpt").decoder.input_extra.weight, new.decoder.input_extra.weight
    )


def _copy(exported: Path, tmp_path: Path) -> Path:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    return folder


def _count_builds(monkeypatch) -> list[str]:
    """Record the device of every model built while loading (meta = free, cpu = allocated)."""
    import captioning.io.model_loading as model_loading

    devices, real = [], model_loading.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        devices.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(model_loading, "build_model", build)
    return devices


def test_a_config_declaring_sizes_its_weights_do_not_have_is_refused_before_allocating(exported, tmp_path, monkeypatch):
    folder = _copy(exported, tmp_path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["init_args"]["encoder"]["init_args"].update(grid_size=866, channels=1000)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    builds = _count_builds(monkeypatch)
    with pytest.raises(ValueError, match=r"the sizes it declares do not match its weights: size mismatch"):
        load_pretrained(folder)
    assert builds == ["meta"]  # nothing was built for real


def test_a_checkpoint_declaring_sizes_its_weights_do_not_have_is_refused_before_allocating(
    shapes_run, tmp_path, monkeypatch
):
    from captioning.io.model_loading import find_checkpoint, load_model

    state = torch.load(find_checkpoint(shapes_run), map_location="cpu", weights_only=True)
    state["hyper_parameters"]["encoder"]["init_args"].update(grid_size=866, channels=1000)
    hostile = tmp_path / "sizes.ckpt"
    torch.save(state, hostile)
    builds = _count_builds(monkeypatch)
    with pytest.raises(ValueError, match=r"sizes.ckpt: the sizes it declares do not match its weights"):
        load_model(hostile)
    assert builds == ["meta"]


def _laughs(depth: int) -> list:
    level: list = ["lol"]
    for _ in range(depth):
        level = [level] * 10  # ten references to the same list: 10**depth leaves, a few bytes each level
    return level


@pytest.mark.parametrize("depth", [7, 40])
def test_shared_reference_bombs_in_hyper_parameters_are_refused(shapes_run, tmp_path, capsys, depth):
    from captioning.io.model_loading import find_checkpoint

    state = torch.load(find_checkpoint(shapes_run), map_location="cpu", weights_only=True)
    state["hyper_parameters"]["notes"] = _laughs(depth)
    hostile = tmp_path / "laughs.ckpt"
    torch.save(state, hostile)
    assert hostile.stat().st_size < 10_000_000
    assert main(["caption", "--ckpt_path", str(hostile), "--no_overlays", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "laughs.ckpt" in err and "more than 2,000,000 entries" in err and "Traceback" not in err


def test_hyper_parameters_that_contain_themselves_are_one_line(shapes_run, tmp_path, capsys):
    from captioning.io.model_loading import find_checkpoint

    state = torch.load(find_checkpoint(shapes_run), map_location="cpu", weights_only=True)
    loop: list = ["a"]
    loop.append(loop)
    state["hyper_parameters"]["notes"] = loop
    hostile = tmp_path / "loop.ckpt"
    torch.save(state, hostile)
    assert main(["caption", "--ckpt_path", str(hostile), "--no_overlays", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "loop.ckpt" in err and "contains itself" in err and "Traceback" not in err


def test_a_yaml_alias_bomb_given_to_attach_encoder_is_refused(shapes_run, tmp_path, capsys):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 30)]
    lines += ["class_path: captioning.nn.encoders.SmallCNN", "init_args: {notes: *a29}"]
    bomb = tmp_path / "encoder.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 3000
    args = ["attach-encoder", "--ckpt_path", str(shapes_run), "--encoder", str(bomb)]
    assert main([*args, "--output", str(tmp_path / "out.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "encoder.yaml" in err and "aliases" in err and not (tmp_path / "out.ckpt").exists()


def test_nan_weights_in_a_model_folder_are_refused_with_one_line(exported, images, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = _copy(exported, tmp_path)
    state = load_file(str(folder / WEIGHTS_FILE))
    state["decoder.output.weight"][0, 0] = float("nan")
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "attention-captioning/1"})
    assert main(["caption", "--model", str(folder), "--no_overlays", "--format", "jsonl", str(images[0])]) == 2
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and "decoder.output.weight" in err and "Traceback" not in err


def test_a_non_finite_hyper_parameter_is_one_line(exported, images, tmp_path, capsys):
    folder = _copy(exported, tmp_path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["init_args"]["dropout"] = float("nan")
    (folder / CONFIG_FILE).write_text(json.dumps(config))  # json writes NaN, and reads it back
    assert main(["caption", "--model", str(folder), "--no_overlays", str(images[0])]) == 2
    err = capsys.readouterr().err
    assert "dropout is nan, not a finite number" in err and "Traceback" not in err


def test_an_exported_folder_gets_the_usual_permissions(exported):
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    assert exported.stat().st_mode & 0o777 == 0o777 & ~umask
    for path in exported.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
