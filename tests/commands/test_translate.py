"""`captioning fit` on the synthetic text config, then `captioning translate` from its checkpoint."""

import json

import pytest
import torch
from PIL import Image

from captioning.commands.main import main as cli_main

from support import ROOT


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    _fit(out)
    ckpts = sorted(out.rglob("last.ckpt"))
    assert len(ckpts) == 1, list(out.rglob("*"))
    metrics = (ckpts[0].parents[1] / "metrics.csv").read_text()
    for key in ("val/exact_match", "val/alignment", "val/bleu", "test/exact_match"):  # test: test_after_fit
        assert key in metrics
    return ckpts[0]


def _fit(out):
    cli_main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "text_dates.yaml"),
            "--trainer.max_epochs",
            "1",
            "--trainer.default_root_dir",
            str(out),
            "--trainer.logger.init_args.save_dir",
            str(out),
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.train_size",
            "64",
            "--data.init_args.val_size",
            "16",
            "--data.init_args.test_size",
            "16",
            "--data.init_args.max_items",
            "2",
            "--data.init_args.batch_size",
            "16",
        ]
    )


def test_fit_stores_vocab_and_tokenizer_as_plain_data(checkpoint):
    hp = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert set(hp["vocab"]) == {"source", "target", "tokenizer"}
    assert "nov" in hp["vocab"]["source"]["itos"] and hp["vocab"]["tokenizer"]["kind"] == "word"


def test_translate_text_arguments_and_heatmaps_never_overwritten(checkpoint, tmp_path, capsys):
    heat = tmp_path / "heat"
    args = [
        "translate",
        "--ckpt_path",
        str(checkpoint),
        "--heatmap_dir",
        str(heat),
        "--beam_size",
        "2",
        "21 nov 2026",
        "3 feb 1999, 4 mar 2000",
    ]
    assert cli_main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    first = sorted(heat.glob("*.png"))
    assert [p.name for p in first] == ["0001-21-nov-2026.png", "0002-3-feb-1999-4-mar-2000.png"]
    record = json.loads((heat / "0001-21-nov-2026.json").read_text())
    assert record["source_tokens"] == ["21", "nov", "2026", "<eos>"] and record["translation"] == lines[0]
    assert len(record["attention"]) == len(record["target_tokens"])
    assert Image.open(first[0]).size[0] > 0
    before = first[0].read_bytes()
    assert cli_main(args) == 0  # second run: new names, the first files untouched
    assert sorted(p.name for p in heat.glob("0001*.png")) == ["0001-21-nov-2026-1.png", "0001-21-nov-2026.png"]
    assert first[0].read_bytes() == before


def test_translate_input_file_keeps_line_alignment(checkpoint, tmp_path, capsys):
    src = tmp_path / "in.tsv"
    src.write_text("21 nov 2026\t2026-11-21\n\n1 jan 2000\n", encoding="utf-8")
    assert cli_main(["translate", "--ckpt_path", str(checkpoint), "--input", str(src)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[1] == ""


def test_translate_errors_name_the_file(checkpoint, tmp_path, capsys):
    assert cli_main(["translate", "--ckpt_path", str(tmp_path / "missing.ckpt"), "hello"]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    assert cli_main(["translate", "--ckpt_path", str(checkpoint), "--input", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"1 jan 2000\n\xff\xfe\n")
    assert cli_main(["translate", "--ckpt_path", str(checkpoint), "--input", str(bad)]) == 2
    assert f"{bad}, line 2" in capsys.readouterr().err
    assert cli_main(["translate", "--ckpt_path", str(checkpoint)]) == 2  # no sentences given


def test_predict_with_a_text_config_writes_one_translation_per_test_sentence(checkpoint, tmp_path):
    out = tmp_path / "translations.json"
    cli_main(
        [
            "predict",
            "--config",
            str(ROOT / "configs" / "text_dates.yaml"),
            "--ckpt_path",
            str(checkpoint),
            "--predictions_path",
            str(out),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",  # the config saved for the run goes there, not into the checkout
            str(tmp_path / "run"),
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.train_size",
            "64",
            "--data.init_args.val_size",
            "16",
            "--data.init_args.test_size",
            "16",
            "--data.init_args.max_items",
            "2",
            "--data.init_args.batch_size",
            "16",
        ]
    )
    results = json.loads(out.read_text())
    assert list((tmp_path / "run").glob("config*.yaml"))
    assert len(results) == 16 and len({r["id"] for r in results}) == 16
    assert {"id", "source", "translation"} <= set(results[0])


def test_exported_text_model_translates_like_its_checkpoint(checkpoint, tmp_path, capsys):
    folder = tmp_path / "dates-model"
    assert cli_main(["export", "--ckpt_path", str(checkpoint), "--output", str(folder)]) == 0
    assert "translate --model" in (folder / "README.md").read_text()
    capsys.readouterr()
    outputs = []
    for source in (["--ckpt_path", str(checkpoint)], ["--model", str(folder)]):
        heat = tmp_path / source[0].strip("-")
        assert cli_main(["translate", *source, "--heatmap_dir", str(heat), "3 feb 1999", "21 nov 2026"]) == 0
        outputs.append(
            (capsys.readouterr().out, sorted(json.loads(p.read_text())["attention"] for p in heat.glob("*.json")))
        )
    assert outputs[0] == outputs[1]


def test_a_stored_tokenizer_that_would_run_a_backtracking_regex_is_refused(checkpoint, tmp_path, capsys):
    from captioning.data.text_vocab import TextTokenizer

    hostile = TextTokenizer.train("bpe", ["aaaa bbb aaaa!"] * 4, vocab_size=40).model
    hostile["pre_tokenizer"] = {
        "type": "Split",
        "pattern": {"Regex": "(a+)+$"},
        "behavior": "Isolated",
        "invert": False,
    }
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["vocab"]["tokenizer"] = {"kind": "bpe", "lowercase": True, "model": hostile}
    bad = tmp_path / "regex.ckpt"
    torch.save(state, bad)
    assert cli_main(["translate", "--ckpt_path", str(bad), "a" * 5000 + "!"]) == 2
    err = capsys.readouterr().err
    assert "pre_tokenizer" in err and "refused" in err and "Traceback" not in err and "panic" not in err.lower()
