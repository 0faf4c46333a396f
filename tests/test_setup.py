"""The reproducible set-up: requirements.lock pins every dependency inside pyproject's ranges,
the suite runs on the locked versions, and the README's "Tested with" line is the lock's."""

from __future__ import annotations

import os
import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            assert pinned, f"requirements.lock: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = pinned
    return pins


def _direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["dev"]
    return [Requirement(d) for d in deps]


def test_the_lock_pins_every_dependency_inside_pyproject_s_ranges():
    pins = _lock()
    for req in _direct_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"the lock's {req.name}=={pins[name]} is outside pyproject's {req.specifier}"


@pytest.mark.skipif(os.environ.get("NLAKIT_DEPS") == "latest",
                    reason="make deps-latest runs the suite on the newest versions on purpose")
def test_the_suite_runs_on_the_locked_versions():
    pins = _lock()
    for req in _direct_requirements():
        try:
            installed = version(req.name).split("+")[0]
        except PackageNotFoundError:
            pytest.fail(f"{req.name} is not installed; run make install")
        locked = pins[canonicalize_name(req.name)]
        assert installed == locked, f"{req.name} {installed} is installed, the lock says {locked}"


def test_the_readme_states_the_locked_versions():
    readme = (ROOT / "README.md").read_text()
    line = re.search(r"Tested with: (.*?)\(a test", readme, re.S)
    assert line, "README has no 'Tested with:' line"
    stated = dict(re.findall(r"([A-Za-z][\w.-]*) (\d[\w.]*)", line.group(1).replace("\n", " ")))
    stated.pop("Python")
    pins = _lock()
    wrong = {n: (v.rstrip(",."), pins.get(canonicalize_name(n))) for n, v in stated.items()
             if pins.get(canonicalize_name(n)) != v.rstrip(",.")}
    assert stated and not wrong, f"README's version, the lock's: {wrong}"
