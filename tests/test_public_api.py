"""``import captioning`` gives the public API, loaded on first use: the import itself stays cheap
(the command line decides OpenMP settings before torch is imported)."""

import subprocess
import sys

import pytest

import captioning


def test_every_public_name_resolves_to_its_defining_module():
    for name in captioning.__all__:
        obj = getattr(captioning, name)
        assert obj is not None and name in dir(captioning)
    assert captioning.ImageCaptioner is captioning.models.image_captioner.ImageCaptioner
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        captioning.nothing  # noqa: B018


def test_importing_the_package_imports_neither_torch_nor_lightning():
    code = "import sys, captioning; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
