"""Which extra a command needs, said in one line when it is missing."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import metadata, version
from pathlib import Path

import pytest

from gc_core.extras import EXTRA_MODULES, missing_extra

ROOT = Path(__file__).resolve().parents[2]


def test_an_installed_extra_is_not_missing() -> None:
    # The test suite runs with every extra installed.
    assert [extra for extra in EXTRA_MODULES if missing_extra(extra) is not None] == []


def test_a_missing_extra_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EXTRA_MODULES, "registry", ("fastapi", "gc_no_such_module"))

    problem = missing_extra("registry")

    assert problem == ("needs the 'registry' extra (gc_no_such_module is missing): "
                       "pip install 'gc-fabric[registry]'")


def test_every_extra_named_in_the_code_is_an_extra_of_the_distribution() -> None:
    extras = metadata("gc-fabric").get_all("Provides-Extra") or []

    assert set(EXTRA_MODULES) <= set(extras)


def test_gc_registry_without_its_extra_says_which_to_install_in_one_line() -> None:
    # Given an install where a module of the registry extra cannot be found
    script = ("import gc_core.extras as extras; "
              "extras.EXTRA_MODULES['registry'] = ('fastapi', 'gc_no_such_module'); "
              "from gc_core.registry.entry_point import main; main()")

    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=False)

    assert ran.returncode == 1
    assert ran.stderr == ("gc-registry needs the 'registry' extra (gc_no_such_module is missing): "
                          "pip install 'gc-fabric[registry]'\n")


def test_gc_registry_without_its_extra_still_tells_its_version() -> None:
    script = ("import sys, gc_core.extras as extras; "
              "extras.EXTRA_MODULES['registry'] = ('fastapi', 'gc_no_such_module'); "
              "sys.argv = ['gc-registry', '--version']; "
              "from gc_core.registry.entry_point import main; main()")

    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=False)

    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith(f"gc-registry {version('gc-fabric')} (gc-fabric, Python ")
