"""Attention overlays, seq2seq heatmaps and the caption result files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.io.results import write_caption_result
from captioning.viz import GAP, attention_overlay, seq2seq_heatmap

P = 100  # panel size used below: font 10 px, label/header line 15 px (see the module docstring)
LINE = 15
HEADER = GAP + LINE  # one line: a short caption, no title


def peaked(grid: int, row: int, col: int) -> np.ndarray:
    m = np.full((grid, grid), 1e-3)
    m[row, col] = 1.0
    return m / m.sum()


def panel(img: Image.Image, index: int, columns: int) -> np.ndarray:
    """Pixels (P, P, 3) of panel ``index`` (0 = the plain image) of an overlay."""
    r, c = divmod(index, columns)
    x0 = GAP + c * (P + GAP)
    y0 = HEADER + GAP + r * (P + LINE + GAP)
    return np.asarray(img, dtype=np.float32)[y0 : y0 + P, x0 : x0 + P]


def heat(pixels: np.ndarray) -> float:
    """Jet colormap: hot = red, cold = dark blue."""
    return float((pixels[..., 0] - pixels[..., 2]).mean())


def test_overlay_size_is_the_panel_grid():
    img = torch.full((3, 64, 64), 0.5)
    out = attention_overlay(img, ["a", "b", "c"], np.random.rand(3, 4, 4), panel_size=P, columns=2)
    # 4 panels (image + 3 words) in 2 columns x 2 rows
    assert out.size == (2 * P + 3 * GAP, HEADER + 2 * (P + LINE) + 3 * GAP)
    assert out.mode == "RGB"


def test_default_columns_keep_the_picture_compact():
    words = [f"w{i}" for i in range(15)]
    out = attention_overlay(torch.rand(3, 32, 32), words, np.random.rand(15, 4, 4), panel_size=P)
    # 16 panels -> 3 rows of at most 6
    assert out.size == (6 * P + 7 * GAP, HEADER + 3 * (P + LINE) + 4 * GAP)


def test_heat_sits_where_the_map_peaks():
    img = torch.full((3, 80, 80), 0.5)
    alphas = np.stack([peaked(4, 0, 0), peaked(4, 3, 3)])
    out = attention_overlay(img, ["top", "bottom"], alphas, panel_size=P, columns=3)
    first, second = panel(out, 1, 3), panel(out, 2, 3)
    tl, br = np.s_[:25, :25], np.s_[-25:, -25:]
    assert heat(first[tl]) > heat(first[br]) + 100
    assert heat(second[br]) > heat(second[tl]) + 100
    assert first[tl].mean() > first[br].mean()  # attended region is also brighter
    assert np.abs(first - second).mean() > 10  # different maps -> different panels
    # the first panel is the plain image
    np.testing.assert_allclose(panel(out, 0, 3), 128, atol=1)


def test_constant_and_zero_maps_render_flat_without_nan():
    img = torch.rand(3, 40, 40)
    alphas = torch.stack([torch.full((5, 5), 1 / 25), torch.zeros(5, 5)])
    out = attention_overlay(img, ["flat", "zero"], alphas, panel_size=P, columns=3)
    a, b = panel(out, 1, 3), panel(out, 2, 3)
    assert np.isfinite(a).all() and a.max() > 0
    np.testing.assert_array_equal(a, b)  # both "no preference": same neutral tint
    # no spurious hot spot: the tint is the same everywhere (only the image varies)
    assert abs(heat(a[:20, :20]) - heat(a[-20:, -20:])) < 25


def test_overlay_accepts_pil_and_rejects_bad_input():
    pil = Image.new("RGB", (50, 30), (200, 10, 10))
    attention_overlay(pil, ["x"], np.ones((1, 3, 3)), panel_size=P)
    with pytest.raises(ValueError, match=r"5 words.*3 attention maps"):
        attention_overlay(pil, list("abcde"), np.ones((3, 2, 2)))
    with pytest.raises(ValueError, match=r"\(T, h, w\)"):
        attention_overlay(pil, ["a"], np.ones((1, 4)))
    with pytest.raises(ValueError, match="normalised input"):
        attention_overlay(torch.full((3, 8, 8), -1.5), ["a"], np.ones((1, 2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        attention_overlay(pil, ["a"], np.full((1, 2, 2), np.nan))


def test_seq2seq_heatmap_labels_and_colours():
    src, tgt = ["the", "cat", "sat", "<eos>"], ["le", "chat", "<eos>"]
    alpha = torch.tensor([[0.9, 0.05, 0.05, 0.0], [0.0, 1.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.7]])
    out = seq2seq_heatmap(src, tgt, alpha)
    w, h = out.size
    assert 4 * 12 < w < 1000 and 3 * 12 < h < 1000
    px = np.asarray(out, dtype=np.float32)
    assert px.std() > 10
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        seq2seq_heatmap(src, tgt, alpha.T)


def test_seq2seq_heatmap_brighter_where_weight_is_higher():
    """inferno: weight 1 is bright yellow, weight 0 is black. With the identity matrix the
    diagonal cells must be the bright ones; with its complement, the off-diagonal ones."""
    alpha = np.array([[1.0, 0.0], [0.0, 1.0]])
    a = np.asarray(seq2seq_heatmap(["x", "y"], ["p", "q"], alpha), dtype=np.float32).mean(-1)
    b = np.asarray(seq2seq_heatmap(["x", "y"], ["p", "q"], 1 - alpha), dtype=np.float32).mean(-1)
    ys, xs = np.nonzero(np.abs(a - b) > 50)  # the cells: everything else (labels, colour bar) is equal
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    ym, xm = (y0 + y1) // 2, (x0 + x1) // 2
    quarters = {
        "tl": np.s_[y0:ym, x0:xm],
        "tr": np.s_[y0:ym, xm:x1],
        "bl": np.s_[ym:y1, x0:xm],
        "br": np.s_[ym:y1, xm:x1],
    }
    bright = {k: a[q].mean() for k, q in quarters.items()}
    assert min(bright["tl"], bright["br"]) > 150 > 40 > max(bright["tr"], bright["bl"])
    assert b[quarters["tr"]].mean() > 150 and b[quarters["tl"]].mean() < 40


def softmax_maps(t: int, h: int, w: int) -> torch.Tensor:
    return torch.softmax(torch.randn(t, h * w), dim=-1).view(t, h, w)


def make_image(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (30, 120, 200)).save(path)


def test_write_caption_result_json(tmp_path):
    src = tmp_path / "in" / "dog.jpg"
    make_image(src)
    words = ["a", "dog", "runs"]
    png, js = write_caption_result(tmp_path / "out", src, words, softmax_maps(3, 3, 5), score=-1.5)
    assert png == tmp_path / "out" / "dog.png" and js == tmp_path / "out" / "dog.json"
    data = json.loads(js.read_text())
    assert data["image"] == str(src)
    assert data["caption"] == "a dog runs" and data["words"] == words
    assert data["grid_size"] == [3, 5] and data["score"] == -1.5
    att = np.array(data["attention"])
    assert att.shape == (3, 3, 5)
    np.testing.assert_allclose(att.sum(axis=(1, 2)), 1.0, atol=1e-3)
    with Image.open(png) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_write_caption_result_never_overwrites_user_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cat.png").write_bytes(b"user png")
    (out / "cat-1.json").write_text("user json")
    src = tmp_path / "cat.jpg"
    make_image(src)
    png, js = write_caption_result(out, src, ["a"], softmax_maps(1, 2, 2))
    assert (png.name, js.name) == ("cat-2.png", "cat-2.json")
    assert (out / "cat.png").read_bytes() == b"user png"
    assert (out / "cat-1.json").read_text() == "user json"
    assert not (out / "cat.json").exists() and not (out / "cat-1.png").exists()
    # overwrite=True may replace them
    png, _ = write_caption_result(out, src, ["a"], softmax_maps(1, 2, 2), overwrite=True)
    assert png.name == "cat.png" and (out / "cat.png").read_bytes() != b"user png"


@pytest.mark.parametrize("overwrite", [False, True])
def test_same_stem_from_two_folders_do_not_clash(tmp_path, overwrite):
    a, b = tmp_path / "a" / "cat.png", tmp_path / "b" / "cat.png"
    make_image(a)
    make_image(b)
    out = tmp_path / "out"
    pa, ja = write_caption_result(out, a, ["one"], softmax_maps(1, 2, 2), overwrite=overwrite)
    pb, jb = write_caption_result(out, b, ["two"], softmax_maps(1, 2, 2), overwrite=overwrite)
    assert pa != pb and ja != jb
    assert json.loads(ja.read_text())["caption"] == "one"
    assert json.loads(jb.read_text())["caption"] == "two"
    if overwrite:  # re-running the same image may replace its own earlier result
        again, _ = write_caption_result(out, a, ["three"], softmax_maps(1, 2, 2), overwrite=True)
        assert again == pa and json.loads(ja.read_text())["caption"] == "three"


def test_write_caption_result_validates(tmp_path):
    with pytest.raises(ValueError, match="cat.jpg"):
        write_caption_result(
            tmp_path, tmp_path / "cat.jpg", ["a", "b"], softmax_maps(3, 2, 2), image=Image.new("RGB", (8, 8))
        )
    png, js = write_caption_result(
        tmp_path, tmp_path / "x.jpg", ["a"], softmax_maps(1, 2, 2), image=torch.rand(3, 8, 8), score=float("nan")
    )
    assert json.loads(js.read_text())["score"] is None


def test_one_caption_scale_keeps_a_flat_map_dim_next_to_a_confident_one():
    from captioning.viz import overlay_panel_boxes

    img = torch.full((3, 80, 80), 0.5)
    alphas = np.stack([np.full((4, 4), 1 / 16), peaked(4, 1, 1)])
    per_word = attention_overlay(img, ["flat", "peak"], alphas, panel_size=P, scale="word")
    shared = attention_overlay(img, ["flat", "peak"], alphas, panel_size=P, scale="caption")
    boxes = overlay_panel_boxes(shared.size, 2, panel_size=P)
    crop = lambda im, k: np.asarray(im.crop(boxes[k]), dtype=np.float32)  # noqa: E731
    # per word, the flat map is a neutral mid tint; on one scale it is as dark as attention gets
    assert heat(crop(shared, 1)) < heat(crop(per_word, 1)) - 30
    assert heat(crop(shared, 2)[25:50, 25:50]) > heat(crop(shared, 1)[25:50, 25:50]) + 100  # the peak is bright
    with pytest.raises(ValueError, match="scale"):
        attention_overlay(img, ["a"], alphas[:1], scale="absolute-ish")


def test_sentinel_bars_show_how_much_each_word_relied_on_language():
    from captioning.viz import _SENTINEL, overlay_panel_boxes

    img = torch.full((3, 80, 80), 0.5)
    out = attention_overlay(
        img, ["image", "language"], np.stack([peaked(4, 0, 0)] * 2), panel_size=P, sentinel=[0.0, 1.0]
    )
    boxes = overlay_panel_boxes(out.size, 2, panel_size=P, sentinel=True)
    px = np.asarray(out)
    for k, filled in ((1, False), (2, True)):
        x0, _, x1, y1 = boxes[k]
        bar = px[y1 + 4, x0 + 2 : x1 - 2]  # a row through the bar under the panel
        assert (np.abs(bar.astype(int) - _SENTINEL).sum(-1) < 10).all() == filled
    with pytest.raises(ValueError, match="sentinel"):
        attention_overlay(img, ["a"], np.ones((1, 2, 2)), sentinel=[0.1, 0.2])


def test_caption_json_records_peak_weights_and_sentinel(tmp_path):
    src = tmp_path / "dog.png"
    make_image(src)
    maps = np.stack([np.full((2, 2), 0.25), peaked(2, 0, 1)])
    _, js = write_caption_result(tmp_path / "out", src, ["a", "dog"], maps, sentinel=[0.7, 0.1])
    meta = json.loads(js.read_text())
    assert meta["peak"][0] == pytest.approx(0.25) and meta["peak"][1] > 0.9
    assert meta["sentinel"] == [0.7, 0.1]
