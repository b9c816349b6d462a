"""W&B settings from the environment, offline fallback without a login, config saving/pushing."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from captioning.io.wandb_logging import WandbLogger, credentials_source, resolve_mode

from support.cli import ROOT, SMALL


@pytest.fixture
def no_login(tmp_path, monkeypatch) -> Path:
    """A user with no W&B credentials anywhere (fresh HOME, no env, no netrc)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in (
        "WANDB_API_KEY",
        "WANDB_IDENTITY_TOKEN_FILE",
        "WANDB_MODE",
        "WANDB_BASE_URL",
        "NETRC",
        "WANDB_PROJECT",
        "WANDB_DIR",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    return home


def test_no_login_falls_back_to_offline_with_one_message(no_login, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = WandbLogger(save_dir=str(tmp_path))
    messages = [str(w.message) for w in caught if "W&B" in str(w.message)]
    assert logger.mode == "offline" and logger._wandb_init["mode"] == "offline"
    assert len(messages) == 1 and "offline" in messages[0] and "wandb sync" in messages[0]


@pytest.mark.parametrize("machine, expected", [("api.wandb.ai", "online"), ("example.com", "offline")])
def test_netrc_login_for_the_wandb_host_counts(no_login, machine, expected):
    netrc = no_login / ".netrc"
    netrc.write_text(f"machine {machine}\n  login user\n  password {'k' * 40}\n")
    netrc.chmod(0o600)
    assert resolve_mode()[0] == expected
    assert (credentials_source() == str(netrc)) == (expected == "online")


def test_api_key_self_hosted_host_and_settings_file_count(no_login, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    netrc = no_login / ".netrc"
    netrc.write_text(f"machine wandb.example.com\n  login user\n  password {'k' * 40}\n")
    netrc.chmod(0o600)
    assert resolve_mode() == ("online", None)
    netrc.unlink()
    settings = no_login / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    settings.write_text("[default]\napi_key = " + "k" * 40 + "\n")
    assert credentials_source() == str(settings)
    settings.unlink()
    assert resolve_mode()[0] == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode() == ("online", None)


@pytest.mark.parametrize(
    "env_mode, expected", [("offline", "offline"), ("dryrun", "offline"), ("disabled", "disabled")]
)
def test_wandb_mode_from_environment_is_respected_silently(no_login, monkeypatch, env_mode, expected):
    monkeypatch.setenv("WANDB_MODE", env_mode)
    assert resolve_mode() == (expected, None)


def test_bad_wandb_mode_is_a_clear_error(no_login, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes'"):
        resolve_mode()


def test_project_and_dir_come_from_environment_unless_given(no_login, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-files"))
    logger = WandbLogger()
    assert logger.name == "from-env" and logger.save_dir == str(tmp_path / "wandb-files")
    assert logger._wandb_init["dir"] == str(tmp_path / "wandb-files")
    explicit = WandbLogger(project="mine", save_dir=str(tmp_path / "mine"))
    assert explicit.name == "mine" and explicit.save_dir == str(tmp_path / "mine")


def _fit(tmp_path: Path, *extra: str) -> None:
    from captioning.commands.main import main

    main(
        [
            "fit",
            *SMALL,
            "--data.init_args.train_size",
            "8",
            "--trainer.max_steps",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.default_root_dir",
            str(tmp_path / "root"),
            *extra,
        ]
    )


def test_second_run_in_same_folder_gets_its_own_config_and_pushes_it(no_login, monkeypatch, tmp_path):
    import wandb

    for var, sub in (("WANDB_DIR", ""), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "again")
    monkeypatch.setenv("CAPTIONING_NO_JAVA", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["captioning"])
    wandb_yaml = ["--config", str(ROOT / "configs" / "trainer" / "wandb.yaml")]
    try:
        for _ in range(2):
            _fit(tmp_path, *wandb_yaml)
            wandb.finish()  # a new process in real life; here one Python process runs both
    finally:
        wandb.finish()
        wandb.teardown()  # stop this process's wandb service; later tests start clean
        monkeypatch.delenv("WANDB_SERVICE", raising=False)
    run_dirs = sorted((tmp_path / "again").iterdir())
    assert len(run_dirs) == 2, "each W&B run keeps checkpoints and config in its own folder"
    for run_dir in run_dirs:
        assert [p.name for p in run_dir.glob("config*.yaml")] == ["config.yaml"]
        [offline] = list((tmp_path / "wandb").glob(f"offline-run-*-{run_dir.name}"))
        assert (offline / "files" / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()

    # Without any logger runs share default_root_dir: a second config gets a new name.
    (tmp_path / "root").mkdir(exist_ok=True)
    (tmp_path / "root" / "config.yaml").write_text("mine: 1\n")
    _fit(tmp_path, "--trainer.logger", "false")
    assert (tmp_path / "root" / "config.yaml").read_text() == "mine: 1\n", "an existing config was overwritten"
    names = sorted(p.name for p in (tmp_path / "root").glob("config*.yaml"))
    assert names == ["config-1.yaml", "config.yaml"]
