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
