"""Packaging the README and CI rely on: CI runs the README's test command, and the exact
versions of constraints.txt lie inside the ranges pyproject.toml allows (so installing with
the constraints never fights the ranges, and the ranges are what a user's torch is checked
against)."""

from __future__ import annotations

import re
import sys

import pytest

from support import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")
from packaging.requirements import Requirement  # noqa: E402  (after the tomllib choice)


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quickstart)


def test_ci_runs_the_readme_test_command_and_both_commands_use_the_constraints():
    setup_and_run, tests = _readme_commands()
    assert tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "-c constraints.txt" in setup_and_run and "-c constraints.txt" in tests


def test_every_pinned_version_is_inside_the_allowed_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    ranges = {}
    for spec in project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]:
        req = Requirement(spec)
        ranges[req.name.lower().replace("_", "-")] = req.specifier
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    assert {"torch", "torchvision", "lightning"} <= pins.keys()
    outside = {n: (pins[n], str(spec)) for n, spec in ranges.items() if n in pins and pins[n] not in spec}
    assert not outside, f"constraints.txt pins versions pyproject.toml does not allow: {outside}"
    unpinned = sorted(n for n in ranges if n not in pins and n != "attention-captioning")
    assert not unpinned, f"dependencies without an exact version in constraints.txt: {unpinned}"


# Releases with known security holes that our use reaches (or that were malicious): a dependency
# range admitting one of them lets pip keep or pick it in a user's environment.
KNOWN_BAD_RELEASES = {
    "pillow": ["10.0.0", "10.2.0"],  # libwebp CVE-2023-4863 (fixed 10.0.1); CVE-2024-28219 (fixed 10.3.0)
    "gradio": ["5.0.0", "6.15.2", "6.19.0"],  # path traversal (fixed 6.16.0); /gradio_api/file=<url> redirect (6.20.0)
    "lightning": ["2.6.2", "2.6.3"],  # malicious releases, withdrawn
}


def test_dependency_floors_refuse_releases_with_known_holes():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]
    ranges = {}
    for spec in specs:
        req = Requirement(spec)
        ranges[req.name.lower()] = req.specifier
    assert KNOWN_BAD_RELEASES.keys() <= ranges.keys()
    admitted = {name: v for name, bad in KNOWN_BAD_RELEASES.items() for v in bad if ranges[name].contains(v)}
    assert not admitted, f"pyproject.toml admits releases with known holes: {admitted}"
