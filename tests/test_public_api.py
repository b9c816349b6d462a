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


def test_the_readme_python_example_captions_with_a_trained_run(shapes_run):
    from PIL import Image

    from captioning import attention_overlay, caption_images, load_model
    from captioning.data.shapes import ShapesDataModule

    model = load_model(shapes_run)  # a run folder: its best checkpoint
    image = Image.fromarray(ShapesDataModule().dataset("test").scene(0).pixels)
    [result] = caption_images(model, [image])
    assert result.words and result.text == " ".join(result.words)
    assert result.attention.shape[0] == len(result.words)
    assert attention_overlay(image, result.words, result.attention).size[0] > image.size[0]
