"""Model files are hostile: a checkpoint builds only model classes we ship, or classes of modules
the user trusts explicitly; nothing else a file names is imported or called."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from captioning.commands.main import main
from captioning.data.vocab import Vocabulary
from captioning.io.model_loading import load_model
from captioning.io.trust import TRUST_ENV, UntrustedClassError
from captioning.models.image_captioner import ImageCaptioner
from captioning.nn.encoders import SmallCNN

from support.cli import cli_command, cli_env

VOCAB = Vocabulary(["a", "red", "circle"]).to_dict()
USER_MODULE = textwrap.dedent('''
    import torch
    from captioning.nn.encoders import Encoder
    from captioning.data.images import Preprocessing


    class TinyUserEncoder(Encoder):
        """A user's own extractor: mean colour of each cell of a 2x2 grid, projected to 8 channels."""

        def __init__(self, channels: int = 8):
            super().__init__()
            self.config = dict(channels=channels)
            self.set_preprocessing(Preprocessing(32))
            self.grid_size, self.out_channels = 2, channels
            self.proj = torch.nn.Linear(3, channels)

        def encode(self, x):
            cells = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(2).transpose(1, 2)  # (B, 4, 3)
            return self.proj(cells)


    def not_a_class(**kwargs):
        raise SystemExit("a function named by a checkpoint was called")
''')


def _save(model, path, **hparams_override):
    hp = {
        "_class_path": f"{type(model).__module__}.{type(model).__qualname__}",
        **dict(model.hparams),
        **hparams_override,
    }
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hp}, path)
    return path


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_extractors.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_extractors

    yield my_extractors
    sys.modules.pop("my_extractors", None)


def test_checkpoint_naming_a_package_function_cannot_delete_a_folder(tmp_path, capsys):
    """The observed attack: a weights_only-clean checkpoint naming write_feature_cache emptied a folder."""
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "thesis.txt").write_text("years of work")
    gadget = tmp_path / "gadget.ckpt"
    torch.save(
        {
            "state_dict": {},
            "hyper_parameters": {
                "_class_path": "captioning.data.feature_cache.write_feature_cache",
                "path": str(victim),
                "image_ids": [0],
                "features": [[[[0.0]]]],
            },
        },
        gadget,
    )
    image = tmp_path / "img.png"
    __import__("PIL.Image").Image.new("RGB", (40, 40)).save(image)
    assert main(["caption", "--ckpt_path", str(gadget), "--output", str(tmp_path / "out"), str(image)]) == 2
    err = capsys.readouterr().err
    assert "write_feature_cache" in err and "only these are built" in err
    assert (victim / "thesis.txt").read_text() == "years of work"


def test_checkpoint_encoder_naming_a_non_encoder_is_refused(tmp_path):
    model = ImageCaptioner(SmallCNN(channels=8, grid_size=2), VOCAB, embed_dim=8, decoder_dim=8, attention_dim=8)
    path = _save(
        model,
        tmp_path / "m.ckpt",
        encoder={"class_path": "captioning.data.feature_cache.FeatureCache", "init_args": {"path": str(tmp_path)}},
    )
    with pytest.raises(UntrustedClassError, match="FeatureCache"):
        load_model(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"surprise": 1}, r"has no argument\(s\) \['surprise'\]"),
        ({"beam_size": torch.ones(2)}, "is a Tensor, not plain data"),
        ({"encoder": None, "vocab": None}, None),
    ],
)
def test_hyper_parameters_are_checked_against_the_signature(tmp_path, override, message):
    model = ImageCaptioner(SmallCNN(channels=8, grid_size=2), VOCAB, embed_dim=8, decoder_dim=8, attention_dim=8)
    hp = {k: v for k, v in override.items() if v is not None}
    path = _save(model, tmp_path / "m.ckpt", **hp)
    if message is None:  # required arguments missing
        ckpt = torch.load(path, weights_only=True)
        for key in override:
            ckpt["hyper_parameters"].pop(key)
        torch.save(ckpt, path)
        message = r"required argument\(s\) \['encoder'\]"
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_user_encoder_is_refused_without_trust_and_loads_with_it(tmp_path, user_module, capsys, monkeypatch):
    model = ImageCaptioner(user_module.TinyUserEncoder(), VOCAB, embed_dim=8, decoder_dim=8, attention_dim=8)
    path = _save(model, tmp_path / "user.ckpt")
    with pytest.raises(UntrustedClassError, match="--trust_module my_extractors"):
        load_model(path)
    loaded = load_model(path, trust_modules=["my_extractors"])
    assert type(loaded.encoder).__name__ == "TinyUserEncoder"
    assert torch.equal(loaded.encoder.proj.weight, model.encoder.proj.weight)
    monkeypatch.setenv(TRUST_ENV, "my_extractors")
    assert type(load_model(path).encoder).__name__ == "TinyUserEncoder"


def test_trusting_a_module_still_builds_only_classes(tmp_path, user_module):
    model = ImageCaptioner(user_module.TinyUserEncoder(), VOCAB, embed_dim=8, decoder_dim=8, attention_dim=8)
    path = _save(model, tmp_path / "f.ckpt", encoder={"class_path": "my_extractors.not_a_class", "init_args": {}})
    with pytest.raises(UntrustedClassError, match="not an encoder class"):
        load_model(path, trust_modules=["my_extractors"])


@pytest.mark.e2e
def test_caption_with_a_user_encoder_needs_the_trust_flag(tmp_path, user_module):
    model = ImageCaptioner(user_module.TinyUserEncoder(), VOCAB, embed_dim=8, decoder_dim=8, attention_dim=8)
    path = _save(model, tmp_path / "user.ckpt")
    image = tmp_path / "photo.jpg"
    __import__("PIL.Image").Image.new("RGB", (50, 40), (200, 10, 10)).save(image)
    env = cli_env(tmp_path, PYTHONPATH=f"{tmp_path}:{cli_env(tmp_path)['PYTHONPATH']}")
    args = ["caption", "--ckpt_path", str(path), "--output", str(tmp_path / "out"), str(image)]
    refused = subprocess.run(cli_command(*args), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--trust_module my_extractors" in refused.stderr
    assert "Traceback" not in refused.stderr
    trusted = subprocess.run(
        cli_command(*args, "--trust_module", "my_extractors"),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trusted.returncode == 0, trusted.stderr
    assert (tmp_path / "out" / "photo.png").is_file() and (tmp_path / "out" / "photo.json").is_file()


@pytest.mark.e2e
def test_checkpoints_and_configs_naming_former_modules_still_load(tmp_path):
    """Checkpoints and run configs of earlier releases name the classes where they lived then."""
    model = ImageCaptioner(SmallCNN(channels=8, grid_size=2), VOCAB, embed_dim=8, decoder_dim=8, attention_dim=8)
    for former in ("captioning.models.ImageCaptioner", "captioning.image_model.ImageCaptioner"):
        loaded = load_model(_save(model, tmp_path / "old.ckpt", _class_path=former))
        assert type(loaded) is ImageCaptioner
        for name, p in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], p), name
    hparams = dict(
        model.hparams,
        encoder={"class_path": "captioning.encoders.SmallCNN", "init_args": model.hparams["encoder"]["init_args"]},
    )
    path = tmp_path / "old-encoder.ckpt"
    torch.save(
        {
            "hyper_parameters": {**hparams, "_class_path": "captioning.image_model.ImageCaptioner"},
            "state_dict": model.state_dict(),
        },
        path,
    )
    assert type(load_model(path).encoder) is SmallCNN
    # The command line imports a former module name as the current module (run configs hold them).
    code = (
        "from captioning import registry; registry.accept_former_module_names()\n"
        "import datamodules.shapes, datamodules.text, captioning.image_model, captioning.data.shapes\n"
        "import captioning.data.text_tasks, captioning.models\n"
        "assert datamodules.shapes.ShapesDataModule is captioning.data.shapes.ShapesDataModule\n"
        "assert datamodules.text.SyntheticTextDataModule is captioning.data.text_tasks.SyntheticTextDataModule\n"
        "assert captioning.image_model.ImageCaptioner is captioning.models.ImageCaptioner\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ok"


def test_a_trusted_user_module_in_the_current_folder_is_found_by_the_console_script(tmp_path, user_module):
    """The installed `captioning` script does not put the current folder on sys.path (python -m
    does); a module the user trusted explicitly is looked for there as well."""
    script = Path(sys.executable).with_name("captioning")
    assert script.is_file(), "pip install -e . installs the console script next to the interpreter"
    model = ImageCaptioner(user_module.TinyUserEncoder(), VOCAB, embed_dim=8, decoder_dim=8, attention_dim=8)
    path = _save(model, tmp_path / "user.ckpt")
    image = tmp_path / "photo.jpg"
    __import__("PIL.Image").Image.new("RGB", (50, 40), (200, 10, 10)).save(image)
    env = cli_env(tmp_path)  # PYTHONPATH without tmp_path, which holds my_extractors.py
    assert str(tmp_path) not in env["PYTHONPATH"].split(os.pathsep)
    args = [str(script), "caption", "--ckpt_path", str(path), "--no_overlays", str(image)]
    run = subprocess.run(
        [*args, "--trust_module", "my_extractors"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    untrusted = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert untrusted.returncode == 2 and "--trust_module my_extractors" in untrusted.stderr


def test_the_model_card_of_a_user_encoder_model_says_what_to_trust_and_install(tmp_path, user_module):
    from captioning.io.model_card import model_card, user_module_imports

    config = {
        "class_path": "captioning.models.image_captioner.ImageCaptioner",
        "init_args": {"encoder": {"class_path": "my_extractors.TinyUserEncoder", "init_args": {}}},
    }
    card = model_card("me/mine", config, None, None, None)
    assert "captioning caption --model me/mine --trust_module my_extractors --output" in card
    assert "load_pretrained(\"me/mine\", trust_modules=['my_extractors'])" in card
    assert "## Code this model needs" in card and "It imports: `torch`." in card
    assert user_module_imports("my_extractors") == ["torch"]
    plain = model_card("me/ours", {**config, "init_args": {}}, None, None, None)
    assert "--trust_module" not in plain and "Code this model needs" not in plain
