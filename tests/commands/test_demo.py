"""``captioning demo`` without a browser: the page's request handlers as plain functions give
what ``captioning caption`` / ``translate`` write, a clear message for every bad input, the
sentinel weight when a model has one, and the same answers under concurrent requests."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.commands import demo as demo_mod
from captioning.commands.demo import Demo, DemoError, caption_request, translate_request, word_html, word_request
from captioning.commands.main import main as cli_main
from captioning.viz import overlay_panel_boxes

from support import ROOT
from support.photos import bomb_png


@pytest.fixture(scope="module")
def ckpt(shapes_run):
    return sorted(shapes_run.rglob("best*.ckpt"))[-1]


@pytest.fixture(scope="module")
def image_demo(ckpt, tmp_path_factory):
    from captioning.io.model_folders import load_any

    return Demo(load_any(str(ckpt)), str(ckpt), tmp_path_factory.mktemp("demo_work"))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from captioning.data.shapes import ShapesDataModule

    return ShapesDataModule().export_images("test", [1], tmp_path_factory.mktemp("scene"))[0]


def _pixels(path_or_image) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB"))


def _oracle_panel(image: Image.Image, alpha: np.ndarray, panel: int = 160) -> np.ndarray:
    """Word panel drawn with viz's own steps (fit, smooth, heat), independent of panel_boxes."""
    from captioning import viz

    base = viz._fit_box(viz._image_array(image), panel)
    heat = viz._heat(base, viz._smooth_maps(alpha[None], *base.shape[:2])[0], viz._colormap("jet"))
    out = np.full((panel, panel, 3), 255, np.uint8)
    y, x = (panel - base.shape[0]) // 2, (panel - base.shape[1]) // 2
    out[y : y + base.shape[0], x : x + base.shape[1]] = heat
    return out


def test_module_imports_without_gradio_and_the_command_names_the_extra(monkeypatch, capsys):
    code = "import sys; sys.modules['gradio'] = None; import captioning.commands.demo; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    assert cli_main(["demo", "--ckpt_path", "anything.ckpt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: the demo needs gradio: pip install 'attention-captioning[demo]'"]


def test_defaults_listen_on_this_machine_only_and_share_nothing():
    args = demo_mod.build_parser().parse_args(["--model", "some/model"])
    assert (args.host, args.share) == ("127.0.0.1", False) and args.concurrency > 1


def test_caption_is_what_the_cli_writes(image_demo, ckpt, scene, tmp_path, capsys):
    # beam 2: this tiny model's beam-3 caption of the scene is empty (tested below)
    assert (
        cli_main(
            ["caption", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "cli"), "--beam_size", "2", str(scene)]
        )
        == 0
    )
    cli_png = tmp_path / "cli" / f"{scene.stem}.png"
    cli_json = json.loads((tmp_path / "cli" / f"{scene.stem}.json").read_text())

    page = caption_request(image_demo, {"path": str(scene), "orig_name": scene.name}, 2)
    assert "demo-error" not in page["status"] and scene.name in page["status"]
    assert page["words"] == cli_json["words"] and page["words"]
    ours = json.loads(Path(page["record"]).read_text())
    assert {k: v for k, v in ours.items() if k != "image"} == {k: v for k, v in cli_json.items() if k != "image"}
    assert np.array_equal(_pixels(page["strip"]), _pixels(cli_png))  # the strip is the CLI's overlay
    # every word's view is its panel of the CLI's overlay, and the panel viz draws for that word
    image = Image.open(scene).convert("RGB")
    boxes = overlay_panel_boxes(Image.open(cli_png).size, len(page["words"]))
    for t in range(len(page["words"])):
        view = word_request(image_demo, page["result"], t)
        assert np.array_equal(_pixels(view["word_image"]), _pixels(Image.open(cli_png).crop(boxes[t + 1])))
        assert np.array_equal(_pixels(view["word_image"]), _oracle_panel(image, page["result"].attention[t]))
        assert f"word {t + 1} of {len(page['words'])}" in view["word_html"]
    first = word_request(image_demo, page["result"], 0)["word_image"]
    assert np.array_equal(_pixels(page["word_image"]), _pixels(first))  # the first word is shown at once


def test_an_empty_caption_still_shows_the_image_and_its_files(image_demo, scene, monkeypatch):
    from captioning.models import inference

    monkeypatch.setattr(
        inference, "caption_images", lambda model, images, **kw: [inference.Caption([], torch.zeros(0, 8, 8), -1.0)]
    )
    page = caption_request(image_demo, str(scene), 3)
    assert page["words"] == [] and page["word_image"] is None and "(empty caption)" in page["word_html"]
    assert len(overlay_panel_boxes(Image.open(page["strip"]).size, 0)) == 1  # the plain image alone
    assert json.loads(Path(page["record"]).read_text())["words"] == []


@pytest.mark.parametrize("n_words", [0, 1, 4, 5, 6, 11, 17])
def test_panel_boxes_follow_the_overlay_layout(n_words):
    from captioning.viz import attention_overlay

    rng = np.random.default_rng(n_words)
    image = Image.fromarray(rng.integers(0, 200, (48, 80, 3), dtype=np.uint8))  # wide: white bands in panels
    alphas = rng.random((n_words, 3, 5)).astype(np.float32)
    words = [f"w{i}" for i in range(n_words)]
    strip = attention_overlay(image, words, alphas, title="a title long enough to wrap onto a second line " * 2)
    boxes = overlay_panel_boxes(strip.size, n_words)
    assert len(boxes) == n_words + 1
    for t in range(n_words):
        assert np.array_equal(_pixels(strip.crop(boxes[t + 1])), _oracle_panel(image, alphas[t]))
    with pytest.raises(ValueError, match="not an overlay"):
        overlay_panel_boxes((strip.width + 1, strip.height), n_words)


@pytest.mark.parametrize("case", ["text", "bomb", "too_many", "missing", "empty", "beam"])
def test_bad_requests_get_one_clear_message(image_demo, scene, tmp_path, case):
    path, beam = tmp_path / "upload" / "holiday.png", 3
    path.parent.mkdir()
    expected = {
        "text": "holiday.png: not an image",
        "bomb": "holiday.png: image is 400,000,000 pixels, more than the limit",
        "too_many": "more than the limit of 1,000 pixels",
        "missing": "holiday.png",
        "empty": "holiday.png",
        "beam": "beam size must be between 1 and 10",
    }[case]
    if case == "text":
        path.write_text("a shopping list, not a picture")
    elif case == "bomb":
        bomb_png(path)
    elif case == "empty":
        path.write_bytes(b"")
    elif case in ("too_many", "beam"):
        path.write_bytes(scene.read_bytes())
        beam = 11 if case == "beam" else beam
    limit = image_demo.max_pixels
    image_demo.max_pixels = 1000 if case == "too_many" else limit
    try:
        page = caption_request(image_demo, {"path": str(path), "orig_name": "holiday.png"}, beam)
    finally:
        image_demo.max_pixels = limit
    assert "demo-error" in page["status"] and expected in page["status"], page["status"]
    assert str(tmp_path) not in page["status"]  # the user's file name, not the server's path
    assert page["words"] == [] and page["strip"] is None and page["record"] is None
    assert caption_request(image_demo, None, 3)["status"] == ""  # a cleared image: nothing to say


def test_sentinel_weight_is_shown_when_the_result_has_one(image_demo, scene, monkeypatch):
    from captioning.models import inference

    real = inference.caption_images

    def with_sentinel(model, images, **kw):
        out = real(model, images, **kw)
        for c in out:
            c.sentinel = torch.linspace(0.1, 0.9, len(c.words))
        return out

    monkeypatch.setattr(inference, "caption_images", with_sentinel)
    page = caption_request(image_demo, {"path": str(scene), "orig_name": scene.name}, 1)
    n = len(page["words"])
    assert page["result"].sentinel == pytest.approx(torch.linspace(0.1, 0.9, n).tolist())
    html = word_request(image_demo, page["result"], n - 1)["word_html"]
    assert "sentinel weight &beta; = 0.90" in html and "10% from the image" in html and "sentinel-bar" in html
    plain = word_html(["a"], 0, np.ones((1, 2, 2)) / 4, None)
    assert "sentinel" not in plain and "row 1, column 1 of the 2&times;2 grid, weight 0.250 (1.0&times;" in plain


def test_words_are_escaped_in_the_page(image_demo):
    html = word_html(["<script>x</script>"], 0, np.ones((1, 2, 2)) / 4, None)
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_concurrent_requests_get_the_sequential_answers(image_demo, tmp_path):
    from captioning.data.shapes import ShapesDataModule

    files = ShapesDataModule().export_images("test", range(8), tmp_path)
    alone = [caption_request(image_demo, str(f), 2) for f in files]
    together: dict[int, dict] = {}
    start = threading.Barrier(8)

    def run(i: int) -> None:
        start.wait()
        together[i] = caption_request(image_demo, str(files[i]), 2)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(together) == list(range(8))
    for i in range(8):
        assert together[i]["words"] == alone[i]["words"]
        np.testing.assert_array_equal(together[i]["result"].attention, alone[i]["result"].attention)
        assert together[i]["strip"] != alone[i]["strip"]  # each request its own files


def test_a_model_that_cannot_be_used_is_a_message(tmp_path, ckpt):
    args = demo_mod.build_parser().parse_args(["--ckpt_path", str(tmp_path / "nowhere.ckpt")])
    demo, problem = demo_mod.load_demo(args, tmp_path)
    assert demo is None and problem.startswith(f"model {tmp_path / 'nowhere.ckpt'} could not be loaded: ")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(Path(ckpt).read_bytes()[:1000])
    demo, problem = demo_mod.load_demo(demo_mod.build_parser().parse_args(["--ckpt_path", str(broken)]), tmp_path)
    assert demo is None and "could not be loaded" in problem and "\n" not in problem
    unused = lambda *args: None  # noqa: E731
    features_only = SimpleNamespace(
        encoder=SimpleNamespace(preprocessing=None, sees_images=False),
        generate=unused,
        words=unused,
        attention_grids=unused,
        sentinel_weights=unused,
        hparams={},
    )
    with pytest.raises(DemoError, match="precomputed features .* attach-encoder"):
        Demo(features_only, "feat-model", tmp_path)


@pytest.fixture(scope="module")
def text_demo(tmp_path_factory):
    from captioning.data.text_tasks import SyntheticTextDataModule
    from captioning.models.seq2seq import Seq2SeqModel

    model = Seq2SeqModel(
        vocab=SyntheticTextDataModule(task="dates").vocab_data,
        embed_dim=16,
        encoder_dim=16,
        decoder_dim=32,
        attention_dim=16,
        max_length=12,
    ).eval()
    return Demo(model, "tiny-text", tmp_path_factory.mktemp("text_work"))


def test_text_model_translates_with_the_cli_files(text_demo, image_demo, scene):
    page = translate_request(text_demo, "12 March 2021", 2)
    assert "demo-error" not in page["status"], page["status"]
    record = json.loads(Path(page["record"]).read_text())
    assert set(record) == {"input", "source", "translation", "source_tokens", "target_tokens", "attention", "score"}
    assert record["translation"] == page["translation"] and record["source"] == "12 March 2021"
    heatmap = Image.open(page["heatmap"])
    assert heatmap.format == "PNG" and np.asarray(record["attention"]).shape == (
        len(record["target_tokens"]),
        len(record["source_tokens"]),
    )
    assert "type a sentence" in translate_request(text_demo, "   ", 2)["status"]
    assert "is a text model" in caption_request(text_demo, str(scene), 2)["status"]
    assert "is an image captioner" in translate_request(image_demo, "hello", 2)["status"]


def test_pages_build_offline_for_each_kind_of_model(image_demo, text_demo, tmp_path):
    pytest.importorskip("gradio")
    import os

    for demo, problem in ((image_demo, None), (text_demo, None), (None, "model x could not be loaded: gone")):
        app = demo_mod.build_app(
            demo, problem, demo_mod.example_images(tmp_path, image_demo.model) if demo is image_demo else ()
        )
        assert app.analytics_enabled is False
        config = json.dumps(app.get_config_file(), default=str)
        assert (problem or "") in config
        assert ("caption-words" in config) == (demo is image_demo) and ("source-text" in config) == (demo is text_demo)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_a_port_in_use_is_one_line(ckpt, capsys):
    pytest.importorskip("gradio")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_main(["demo", "--ckpt_path", str(ckpt), "--port", str(port), "--no_examples"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot serve on 127.0.0.1:{port} (") and line.endswith(
        "): choose another --port or --host"
    )


def test_an_example_id_with_slashes_stays_inside_the_examples_folder(image_demo, tmp_path):
    from captioning.commands.demo import example_images
    from captioning.io.model_card import pack_example

    model = image_demo.model
    saved = getattr(model, "checkpoint_info", None)
    image = Image.new("RGB", (40, 30), (10, 200, 10))
    model.checkpoint_info = {"example": pack_example({"image": image, "image_id": "../../etc/x/y", "references": []})}
    try:
        paths = example_images(tmp_path / "examples", model)
    finally:
        model.checkpoint_info = saved
    assert all(p.parent == tmp_path / "examples" and p.is_file() for p in paths)
    assert paths[0].name.startswith("example_") and "/" not in paths[0].name[len("example_") :]


def test_an_upload_named_with_dots_only_is_captioned(image_demo, scene):
    result = image_demo.caption(scene, "...png")
    assert result.strip.name == "image.png" and result.record.name == "image.json"


def test_a_tokenizer_that_fails_on_a_sentence_answers_with_a_message(text_demo, monkeypatch):
    from captioning.data.text_vocab import TextTokenizer

    class Panic(BaseException):  # what pyo3 raises for a Rust panic: not an Exception
        pass

    class Exploding:
        def encode(self, text):
            raise Panic("regex backtracking limit")

    bpe = TextTokenizer("bpe", True, TextTokenizer.train("bpe", ["aaa bbb"] * 3, vocab_size=30).model)
    bpe.__dict__["_subword"] = Exploding()  # the cached tokenizers.Tokenizer
    monkeypatch.setattr(text_demo.model.text_vocab, "tokenizer", bpe)
    page = translate_request(text_demo, "a" * 3000 + "!", 1)
    assert "the subword tokenizer failed on this text" in page["status"] and page["translation"] == ""
