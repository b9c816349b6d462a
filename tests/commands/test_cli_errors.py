"""User errors end every command with one line ``error: ...`` and exit status 2; bugs keep their
traceback; ``--debug`` / ``CAPTIONING_DEBUG=1`` shows every traceback."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import captioning.commands.main as cli
from captioning.commands.main import main
from captioning.data.images import ImageReadError
from captioning.data.shapes import ShapesDataModule
from captioning.data.text import TsvFormatError
from captioning.errors import UserError, find_user_error, split_debug, user_message

from support.cli import ROOT, cli_command, cli_env

COCO = ["fit", "--config", str(ROOT / "configs" / "coco.yaml")]
TSV = ["fit", "--config", str(ROOT / "configs" / "text_tsv.yaml")]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _bad_tsv(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.tsv"
    path.write_text("hello\tbonjour\nno tab on this line\nyes\toui\n", encoding="utf-8")
    return path


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(*args), env=cli_env(tmp_path, **env), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


@pytest.mark.e2e
def test_missing_karpathy_json_is_one_line_exit_2_without_traceback(tmp_path):
    missing = tmp_path / "data" / "dataset_coco.json"
    done = _run(
        [*COCO, "--data.init_args.karpathy_json", str(missing), "--trainer.default_root_dir", str(tmp_path / "runs")],
        tmp_path,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "compute_fn" not in done.stderr and "usage:" not in done.stderr
    [line] = _error_lines(done.stderr)
    assert line.startswith(f"error: {missing}: no such file"), line
    assert len(done.stderr.strip().splitlines()) <= 3, done.stderr  # the error and at most Lightning's "Seed set"


def test_missing_karpathy_json_in_process_returns_2_and_prints_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nope.json"
    assert main([*COCO, "--data.init_args.karpathy_json", str(missing)]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [_error_lines(err)[0]] and str(missing) in _error_lines(err)[0]
    assert "Traceback" not in err


def test_malformed_tsv_line_is_one_line_naming_file_and_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = _bad_tsv(tmp_path)
    assert main([*TSV, "--data.init_args.train_path", str(bad)]) == 2
    err = capsys.readouterr().err
    [line] = _error_lines(err)
    assert line.startswith(f"error: {bad}, line 2: missing tab"), line
    assert "Traceback" not in err and "compute_fn" not in err


@pytest.mark.e2e
def test_debug_flag_anywhere_shows_the_traceback(tmp_path, monkeypatch):
    bad = _bad_tsv(tmp_path)
    done = _run([*TSV, "--data.init_args.train_path", str(bad), "--debug"], tmp_path)
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
    assert "TsvFormatError" in done.stderr and "line 2: missing tab" in done.stderr
    # In-process: the exception propagates, with the flag first or taken from the environment.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as caught:
        main(["--debug", *TSV, "--data.init_args.train_path", str(bad)])
    assert isinstance(find_user_error(caught.value), TsvFormatError)
    monkeypatch.setenv("CAPTIONING_DEBUG", "1")
    with pytest.raises(ValueError):
        main([*TSV, "--data.init_args.train_path", str(bad)])


def test_internal_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    def broken(datamodule):
        return datamodule.no_such_attribute  # a bug: AttributeError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ShapesDataModule, "vocab_data", property(broken))
    with pytest.raises(Exception) as caught:
        main(["fit", "--config", str(ROOT / "configs" / "shapes.yaml"), "--trainer.default_root_dir", str(tmp_path)])
    assert isinstance(caught.value.__cause__, AttributeError)
    assert not _error_lines(capsys.readouterr().err)


@pytest.mark.e2e
def test_internal_bug_in_subprocess_exits_1_with_traceback(tmp_path):
    done = _run(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "shapes.yaml"),
            "--data",
            "support.datamodules.BuggyShapes",
            "--trainer.default_root_dir",
            str(tmp_path / "runs"),
        ],
        tmp_path,
    )
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "ZeroDivisionError" in done.stderr


def test_unknown_option_keeps_jsonargparse_usage_error_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["fit", "--config", str(ROOT / "configs" / "shapes.yaml"), "--no_such_option", "1"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and _error_lines(err) == ["error: unrecognized arguments: --no_such_option 1"]


def test_argparse_commands_print_user_errors_as_one_line(tmp_path, capsys, monkeypatch):
    not_cached = str(ROOT / "configs" / "shapes.yaml")
    assert main(["cache-features", "--config", not_cached]) == 2  # a ValueError of ours
    [line] = _error_lines(capsys.readouterr().err)
    assert "use a cached config" in line
    missing = tmp_path / "missing.yaml"
    with pytest.raises(SystemExit) as exit_info:  # jsonargparse's usage error, as for `fit`
        main(["cache-features", "--config", str(missing)])
    assert exit_info.value.code == 2 and str(missing) in capsys.readouterr().err
    # A command added later gets the same handling: UserError -> one line; a bug -> traceback.
    for name, fn in (("user-error", _raises_user_error), ("bug", _raises_bug)):
        module = types.ModuleType(f"command_{name}")
        module.main = fn  # a command is a module with main(args)
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(cli.COMMANDS, name, (module.__name__, "test"))
    assert main(["user-error", "--x"]) == 2
    assert _error_lines(capsys.readouterr().err) == ["error: cannot use --x: it is wrong; give --y"]
    with pytest.raises(ValueError, match="internal"):
        main(["bug"])


def _raises_user_error(argv: list[str]) -> int:
    raise UserError(f"cannot use {argv[0]}: it is wrong;\n give --y")


def _raises_bug(argv: list[str]) -> int:
    raise ValueError("internal: not a user error (raised outside captioning/)")


def test_worker_errors_are_unwrapped_and_library_value_errors_are_bugs():
    # ImageReadError as torch re-raises it from a DataLoader worker: the original message
    worker = ImageReadError(
        "Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "/x/fetch.py", line 3, in fetch\n    data = self.dataset[i]\n'
        "captioning.data.images.ImageReadError: /data/a.jpg: not a readable image\n"
    )
    assert user_message(worker) == "/data/a.jpg: not a readable image"
    # A ValueError raised inside torch is a bug, not a user error
    with pytest.raises(ValueError) as caught:
        torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    assert find_user_error(caught.value) is None
    assert split_debug(["fit", "--debug", "-c", "x"])[0] == ["fit", "-c", "x"]


def test_invalid_trainer_setting_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "shapes.yaml"),
                "--trainer.accelerator",
                "cpu",
                "--trainer.devices",
                "0",
            ]
        )
        == 2
    )  # Lightning's MisconfigurationException
    err = capsys.readouterr().err
    assert _error_lines(err) == ["error: `Trainer(devices='0')` value is not a valid input using cpu accelerator."]
    assert "Traceback" not in err
