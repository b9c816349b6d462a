"""Result pairs (``<stem>.png`` + ``<stem>.json``, written by caption, translate and the demo):
whole or not at all, never over a user's file, never through a symbolic link, with the
permissions a plain file would get."""

from __future__ import annotations

import json
import os
import stat

import pytest
from PIL import Image

from captioning.io.outputs import check_writable, free_path, write_result_pair


class FailingPicture:
    """A picture whose saving fails half way (a full disk)."""

    def save(self, f, format: str) -> None:
        f.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")


def _picture(colour: str = "red") -> Image.Image:
    return Image.new("RGB", (4, 4), colour)


def test_a_pair_is_written_under_free_names_and_never_over_a_users_file(tmp_path):
    (tmp_path / "cat.png").write_bytes(b"the user's own file")
    png, js = write_result_pair(tmp_path, "cat", "photos/cat.jpg", _picture(), {"caption": "a cat"})
    assert (png.name, js.name) == ("cat-1.png", "cat-1.json")
    assert (tmp_path / "cat.png").read_bytes() == b"the user's own file"
    assert Image.open(png).size == (4, 4) and json.loads(js.read_text()) == {"caption": "a cat"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert free_path(tmp_path / "cat.png").name == "cat-2.png"


def test_a_failed_write_leaves_nothing_and_an_earlier_pair_whole(tmp_path):
    with pytest.raises(OSError, match="No space left"):
        write_result_pair(tmp_path, "dog", "dog.jpg", FailingPicture(), {"caption": "a dog"})
    assert list(tmp_path.iterdir()) == []  # neither file, nor the name held for it, nor a temp file

    png, js = write_result_pair(tmp_path, "dog", "dog.jpg", _picture(), {"caption": "a dog"})
    before = png.read_bytes(), js.read_text()
    with pytest.raises(OSError, match="No space left"):
        write_result_pair(tmp_path, "dog", "dog.jpg", FailingPicture(), {"caption": "new"}, overwrite=True)
    assert (png.read_bytes(), js.read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog.json", "dog.png"]


def test_overwrite_replaces_only_the_same_sources_result(tmp_path):
    write_result_pair(tmp_path, "cat", "a/cat.jpg", _picture(), {"caption": "first"}, overwrite=True)
    png, js = write_result_pair(tmp_path, "cat", "a/cat.jpg", _picture("blue"), {"caption": "again"}, overwrite=True)
    assert js.name == "cat.json" and json.loads(js.read_text()) == {"caption": "again"}
    other_png, other_js = write_result_pair(tmp_path, "cat", "b/cat.jpg", _picture(), {"caption": "b"}, overwrite=True)
    assert other_js.name == "cat-1.json" and json.loads(js.read_text()) == {"caption": "again"}


@pytest.mark.parametrize("overwrite", [False, True])
def test_symbolic_links_in_the_output_folder_are_never_written_through(tmp_path, overwrite):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.png").symlink_to(tmp_path / "elsewhere.png")  # dangling
    (out / "x.json").symlink_to(precious)
    png, js = write_result_pair(out, "x", "x.jpg", _picture(), {"caption": "x"}, overwrite=overwrite)
    assert precious.read_text() == "keep me" and not (tmp_path / "elsewhere.png").exists()
    if overwrite:  # the links themselves are replaced by the result files
        assert png == out / "x.png" and not png.is_symlink() and not js.is_symlink()
    else:  # the names are taken: the result goes beside them
        assert png.name == "x-1.png" and (out / "x.json").is_symlink()


def test_result_files_get_the_permissions_of_a_plain_file(tmp_path):
    old = os.umask(0o022)
    os.umask(old)
    png, js = write_result_pair(tmp_path, "cat", "cat.jpg", _picture(), {"caption": "a cat"})
    for path in (png, js):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~old, path


def test_an_unwritable_folder_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match=r"cannot write into the --output folder .*file"):
        check_writable(blocker / "sub")


def test_json_lines_are_valid_json_and_terminal_safe():
    import json
    import math

    from captioning.io.outputs import json_line, terminal_text

    line = json_line({"score": float("nan"), "inf": [float("inf"), 1.5], "image": "a\x1b[2J\x9bb\u00e9"})
    assert "NaN" not in line and "Infinity" not in line and "\x1b" not in line and "\x9b" not in line
    back = json.loads(line)
    assert back["score"] is None and back["inf"] == [None, 1.5] and back["image"] == "a\x1b[2J\x9bb\u00e9"
    assert terminal_text("tab\there\\ and\nline\x07") == "tab\\there\\\\ and\\nline\\x07"
    assert math.isfinite(json.loads(json_line({"x": 2.0}))["x"])
