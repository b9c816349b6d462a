"""notebooks/quickstart.ipynb runs top to bottom (tiny sizes) and shows overlays inline."""

from __future__ import annotations

import pytest

from support import ROOT

pytestmark = pytest.mark.e2e  # end to end: the whole notebook (run with -m e2e)

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_trains_captions_and_shows_overlays(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="install the [dev] extra")
    nbclient = pytest.importorskip("nbclient", reason="install the [dev] extra")
    monkeypatch.setenv("QUICKSTART_TRAIN_SIZE", "32")
    monkeypatch.setenv("QUICKSTART_EPOCHS", "1")
    monkeypatch.setenv("QUICKSTART_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("CAPTIONING_NO_JAVA", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "def " not in source and "class " not in source, "logic belongs in the package, not the notebook"
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # two validation overlays from the callback + the captioned file
    assert (tmp_path / "quickstart.ckpt").is_file()
    assert list(tmp_path.glob("val_attention/epoch000-*/0.png")), "the callback's PNG files"
