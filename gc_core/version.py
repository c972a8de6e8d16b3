"""gc-fabric's version, from one source: the installed distribution's metadata, which
``pyproject.toml`` sets. Every package's ``__version__`` and every command line's
``--version`` read it from here."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["DISTRIBUTION", "VERSION"]

#: The distribution whose metadata holds the version (pyproject.toml's ``name``).
DISTRIBUTION = "gc-fabric"


def _installed_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


#: The installed gc-fabric's version, as ``pip show gc-fabric`` gives it.
VERSION = _installed_version()
