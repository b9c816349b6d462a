"""Weights & Biases logging that never blocks a run: environment first, offline without a login.

:class:`WandbLogger` is Lightning's logger with three changes:

* ``project`` and ``save_dir`` default to ``$WANDB_PROJECT`` and ``$WANDB_DIR`` (Lightning's
  own logger passes ``dir="."`` to ``wandb.init``, which silently overrides ``WANDB_DIR``);
  ``$WANDB_MODE`` (online/offline/disabled) is left to wandb, which reads it itself.
* Without credentials (no ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, netrc entry or
  settings-file key) an online run would ask for a login, or fail without a terminal. It
  switches to offline instead and says so once, with the ``wandb sync`` command to upload later.
* ``resume_run(run_id)`` lets a resumed job (``--ckpt_path last``) keep logging to the same
  run (see :mod:`captioning.io.run_folders`).

Nothing here touches the network: the credential check only reads files and variables.
"""

from __future__ import annotations

import configparser
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

DEFAULT_PROJECT = "attention-captioning"
DEFAULT_HOST = "https://api.wandb.ai"
_MODES = ("online", "offline", "disabled", "dryrun", "run")


def _settings_file() -> Path:
    """wandb's global settings file ($WANDB_CONFIG_DIR/settings, else ~/.config/wandb/settings)."""
    base = os.environ.get("WANDB_CONFIG_DIR") or Path("~/.config/wandb").expanduser()
    return Path(base) / "settings"


def _settings_value(key: str) -> str | None:
    parser = configparser.ConfigParser()
    try:
        parser.read(_settings_file())
    except (configparser.Error, OSError, UnicodeDecodeError):
        return None
    return parser.get("default", key, fallback=None) or None


def _netrc_path() -> Path | None:
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        path = Path(name).expanduser()
        if path.exists():
            return path
    return None


def credentials_source() -> str | None:
    """Where wandb would find a login for the configured host, or None. Reads no network.

    Checked like wandb does: ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, the netrc
    entry of the host (``WANDB_BASE_URL``, default api.wandb.ai), the settings file's api_key.
    """
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(var, "").strip():
            return var
    host = os.environ.get("WANDB_BASE_URL") or _settings_value("base_url") or DEFAULT_HOST
    path = _netrc_path()
    if path is not None:
        try:
            entry = netrc.netrc(path).authenticators(urlsplit(host).netloc)
        except (netrc.NetrcParseError, OSError):
            entry = None
        if entry and entry[2]:
            return str(path)
    if _settings_value("api_key"):
        return str(_settings_file())
    return None


def resolve_mode(offline: bool = False) -> tuple[str, str | None]:
    """The mode to give wandb.init and, when we changed it, why (the one message to print).

    ``offline=True`` or ``WANDB_MODE=offline|dryrun`` -> offline; ``WANDB_MODE=disabled`` ->
    disabled; anything that would go online without credentials -> offline plus a reason.
    """
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode and env_mode not in _MODES:
        raise ValueError(f"WANDB_MODE={env_mode!r} is not one of {', '.join(_MODES)}")
    if offline or env_mode in ("offline", "dryrun"):
        return "offline", None
    if env_mode == "disabled":
        return "disabled", None
    if credentials_source() is None:
        return "offline", ("no W&B login found (WANDB_API_KEY, ~/.netrc or `wandb login`), so this run logs offline")
    return "online", None


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger with environment defaults and an offline fallback (module doc).

    Args:
        name: display name of the run (W&B picks one if None).
        save_dir: folder for W&B files (``<save_dir>/wandb/...``) and, under
            ``<save_dir>/<project>/<run id>/``, checkpoints and the saved config.
            None = ``$WANDB_DIR``, else the current folder.
        project: W&B project; None = ``$WANDB_PROJECT``, else ``attention-captioning``.
        offline: force offline (``wandb sync`` uploads later).
        id: run id to create or resume (normally set by ``--ckpt_path`` resume).
        log_model: upload checkpoints as W&B artifacts (needs online mode).
        **kwargs: passed to ``wandb.init`` (entity, group, tags, notes, ...).
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | None = None,
        project: str | None = None,
        offline: bool = False,
        id: str | None = None,
        log_model: bool | str = False,
        prefix: str = "",
        **kwargs: Any,
    ) -> None:
        mode, reason = resolve_mode(offline)
        save_dir = os.fspath(save_dir or kwargs.pop("dir", None) or os.environ.get("WANDB_DIR") or ".")
        if reason is not None:
            rank_zero_warn(
                f"{reason} to {Path(save_dir).resolve() / 'wandb'}. Upload it later with "
                f"`wandb sync {Path(save_dir).resolve() / 'wandb'}/offline-run-*`."
            )
        if mode != "online" and log_model:
            rank_zero_warn(f"W&B is {mode}: log_model={log_model!r} is ignored (checkpoints stay on disk)")
            log_model = False
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            id=id,
            log_model=log_model,  # type: ignore[arg-type]  # "all" or a bool, as Lightning documents
            prefix=prefix,
            mode=mode,
            **kwargs,
        )
        self.mode = mode

    def resume_run(self, run_id: str) -> None:
        """Log to the existing run ``run_id`` (call before the run starts)."""
        if self._experiment is not None:
            if self._experiment.id != run_id:
                raise RuntimeError(f"W&B run {self._experiment.id} already started; cannot resume {run_id}")
            return
        self._id = self._wandb_init["id"] = run_id
        self._wandb_init["resume"] = "allow"
