"""``gc-registry``: the registry's CLI, once the ``registry`` extra is known to be installed."""

from __future__ import annotations

import sys

from gc_core.cli import VERSION_LINE
from gc_core.extras import missing_extra
from gc_core.version import VERSION

__all__ = ["main"]


def main() -> None:
    """Run ``gc-registry``; without the ``registry`` extra, say what to install and exit 1."""
    problem = missing_extra("registry")
    if problem is not None and sys.argv[1:] == ["--version"]:  # as every CLI answers it
        print(VERSION_LINE % {"prog": "gc-registry", "version": VERSION})
        return
    if problem is not None:
        sys.exit(f"gc-registry {problem}")
    # Imported here: FastAPI, SQLAlchemy and Alembic load only once they are known to be there.
    from gc_core.registry.cli import main as run_cli

    run_cli()
