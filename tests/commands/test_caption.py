"""``captioning caption`` on real use: folders, JSON lines, hostile or odd images, unwritable
outputs, the wrong kind of model, and no ``<unk>`` in captions by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioning.commands.main import main

from support.photos import bomb_png


@pytest.fixture(scope="module")
def ckpt(shapes_run):
    return sorted(shapes_run.rglob("best*.ckpt"))[-1]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from captioning.data.shapes import ShapesDataModule

    return ShapesDataModule().export_images("test", [0, 1, 2], tmp_path_factory.mktemp("scenes"))


def test_folders_are_searched_recursively_and_jsonl_gives_one_object_per_image(ckpt, scenes, tmp_path, capsys):
    folder = tmp_path / "album"
    (folder / "2024" / "summer").mkdir(parents=True)
    for i, scene in enumerate(scenes):
        target = folder / ("2024/summer" if i else ".") / scene.name
        target.write_bytes(scene.read_bytes())
    (folder / "notes.txt").write_text("not an image, and not picked from a folder")
    assert (
        main(
            [
                "caption",
                "--ckpt_path",
                str(ckpt),
                "--output",
                str(tmp_path / "out"),
                "--format",
                "jsonl",
                "--batch_size",
                "2",
                "--progress",
                "on",
                str(folder),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert sorted(Path(r["image"]).name for r in records) == sorted(s.name for s in scenes)
    assert all(Path(r["overlay"]).is_file() and Path(r["json"]).is_file() for r in records)
    assert "3/3" in captured.err  # the progress bar reached the end


def test_one_record_per_line_whatever_the_file_name(ckpt, scenes, tmp_path, capsys):
    odd = tmp_path / "line one\nline\ttwo.png"
    odd.write_bytes(scenes[0].read_bytes())
    assert main(["caption", "--ckpt_path", str(ckpt), "--no_overlays", str(odd), str(scenes[1])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].split("\t")[0] == str(tmp_path) + "/line one\\nline\\ttwo.png"
    assert lines[0].count("\t") == 1


def test_a_decompression_bomb_is_refused_by_name_and_the_others_are_captioned(ckpt, scenes, tmp_path, capsys):
    bomb = bomb_png(tmp_path / "bomb.png")
    code = main(
        [
            "caption",
            "--ckpt_path",
            str(ckpt),
            "--output",
            str(tmp_path / "out"),
            str(scenes[0]),
            str(bomb),
            str(scenes[1]),
        ]
    )
    captured = capsys.readouterr()
    assert code == 1  # one image failed
    assert "bomb.png" in captured.err and "Traceback" not in captured.err
    assert len([line for line in captured.out.splitlines() if "\t" in line]) == 2
    assert (tmp_path / "out" / f"{scenes[1].stem}.png").is_file()


def test_unwritable_output_fails_before_loading_or_decoding(ckpt, scenes, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["caption", "--ckpt_path", str(ckpt), "--output", str(blocker / "out"), str(scenes[0])]) == 2
    captured = capsys.readouterr()
    assert "cannot write into the --output folder" in captured.err and str(blocker / "out") in captured.err
    assert "using checkpoint" not in captured.err and captured.out == ""


def test_a_tiny_image_is_captioned_with_a_warning(ckpt, tmp_path, capsys):
    tiny = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (200, 0, 0)).save(tiny)
    assert main(["caption", "--ckpt_path", str(ckpt), "--no_overlays", str(tiny)]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "dot.png" in err and "1x1" in err


def test_a_text_checkpoint_is_a_clear_error(tmp_path, capsys):
    from captioning.data.text_tasks import synthetic_vocab
    from captioning.models.seq2seq import Seq2SeqModel

    model = Seq2SeqModel(synthetic_vocab("dates").to_dict(), embed_dim=8, encoder_dim=8, decoder_dim=8, attention_dim=8)
    path = tmp_path / "text.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": {"_class_path": "captioning.models.seq2seq.Seq2SeqModel", **dict(model.hparams)},
        },
        path,
    )
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(image)
    assert main(["caption", "--ckpt_path", str(path), "--no_overlays", str(image)]) == 2
    err = capsys.readouterr().err
    assert "not an image captioner" in err and "translate" in err and "Traceback" not in err


def test_unk_is_never_emitted_unless_allowed(ckpt, scenes, tmp_path, capsys):
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    unk = state["hyper_parameters"]["vocab"]["itos"].index("<unk>")
    state["state_dict"]["decoder.output.bias"][unk] = 50.0  # <unk> is now by far the likeliest word
    biased = tmp_path / "likes_unk.ckpt"
    torch.save(state, biased)
    for flags, expect_unk in (([], False), (["--allow_unk"], True)):
        assert main(["caption", "--ckpt_path", str(biased), "--no_overlays", *flags, *map(str, scenes)]) == 0
        captions = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]
        assert len(captions) == 3 and any("<unk>" in c for c in captions) == expect_unk, captions


def test_file_names_with_terminal_escapes_are_printed_escaped(ckpt, scenes, tmp_path, capsys):
    odd = tmp_path / "evil\x1b]0;owned\x07\x1b[2J\x9b31m.png"
    odd.write_bytes(scenes[0].read_bytes())
    broken = tmp_path / "\x1b[31mbroken.png"
    broken.write_bytes(b"not an image")
    assert main(["caption", "--ckpt_path", str(ckpt), "--no_overlays", str(odd), str(broken)]) == 1
    captured = capsys.readouterr()
    for stream in (captured.out, captured.err):
        assert not any(c in stream for c in "\x1b\x07\x9b"), stream
    assert "evil\\x1b]0;owned\\x07\\x1b[2J\\x9b31m.png\t" in captured.out
    assert "\\x1b[31mbroken.png" in captured.err


@pytest.mark.parametrize("name", ["...png", "..png"])
def test_dot_only_file_names_are_captioned_into_ordinary_names(ckpt, scenes, tmp_path, capsys, name):
    odd = tmp_path / "in" / name
    odd.parent.mkdir()
    odd.write_bytes(scenes[0].read_bytes())
    out = tmp_path / "out"
    assert main(["caption", "--ckpt_path", str(ckpt), "--output", str(out), "--format", "jsonl", str(odd)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert Path(record["overlay"]).name == "image.png" and Path(record["json"]).name == "image.json"
    assert sorted(p.name for p in out.iterdir()) == ["image.json", "image.png"]


def test_a_failed_write_is_one_line_and_the_other_images_are_still_captioned(
    ckpt, scenes, tmp_path, capsys, monkeypatch
):
    import captioning.io.outputs as outputs

    out = tmp_path / "out"
    assert main(["caption", "--ckpt_path", str(ckpt), "--output", str(out), str(scenes[1])]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    real_fdopen, calls = outputs.os.fdopen, []

    def disk_fills_up(fd, *args, **kwargs):  # the 2nd image's PNG and everything after it fail
        calls.append(fd)
        if len(calls) >= 3:
            import errno
            import os

            os.close(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(outputs.os, "fdopen", disk_fills_up)
    args = ["caption", "--ckpt_path", str(ckpt), "--output", str(out), "--overwrite", "--batch_size", "1"]
    assert main([*args, *map(str, scenes)]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3  # every image captioned
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("No space left on device" in e for e in errors)
    assert scenes[1].name in errors[0] and "Traceback" not in captured.err
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    stem = scenes[1].stem
    assert after[f"{stem}.png"] == before[f"{stem}.png"] and after[f"{stem}.json"] == before[f"{stem}.json"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no partial file left


def test_symbolic_links_in_the_output_folder_are_replaced_never_followed(ckpt, scenes, tmp_path, capsys):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    precious = elsewhere / "precious.txt"
    precious.write_text("keep me")
    stem = scenes[0].stem
    (out / f"{stem}.png").symlink_to(precious)
    (out / f"{stem}.json").symlink_to(elsewhere / "created.json")  # dangling
    assert main(["caption", "--ckpt_path", str(ckpt), "--output", str(out), "--overwrite", str(scenes[0])]) == 0
    assert precious.read_text() == "keep me" and not (elsewhere / "created.json").exists()
    assert not (out / f"{stem}.png").is_symlink() and (out / f"{stem}.png").stat().st_size > 0


def test_what_a_third_party_encoder_prints_stays_off_the_records(ckpt, scenes, monkeypatch, capsys):
    import captioning.io.model_folders as model_folders

    real = model_folders.load_any

    def chatty_load(*args, **kwargs):
        print("Loading weights from the vendor's cache ... done")
        return real(*args, **kwargs)

    monkeypatch.setattr(model_folders, "load_any", chatty_load)
    assert main(["caption", "--ckpt_path", str(ckpt), "--no_overlays", "--format", "jsonl", str(scenes[0])]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["image"] for line in captured.out.splitlines()] == [str(scenes[0])]
    assert "vendor's cache" in captured.err
