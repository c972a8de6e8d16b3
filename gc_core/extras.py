"""The optional parts of gc-fabric, one extra of the distribution each.

``pip install gc-fabric`` is the client; the agent, the registry service, the
high-throughput engine and PostgreSQL support each come with an extra
(``pip install 'gc-fabric[agent]'``), as pyproject.toml lists. A command that needs one
says which, in one line, instead of failing on an import.
"""

from __future__ import annotations

from importlib.util import find_spec

__all__ = ["EXTRA_MODULES", "missing_extra"]

#: The modules, by import name, each extra brings (pyproject.toml names their distributions).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "agent": ("jinja2", "jsonschema", "prometheus_client"),
    "registry": ("fastapi", "uvicorn", "sqlalchemy", "alembic", "prometheus_client",
                 "jinja2"),
    "htex": ("parsl",),
    "postgres": ("psycopg",),
}


def missing_extra(extra: str) -> str | None:
    """What to install when a module of ``extra`` is missing; None when all are there.

    >>> missing_extra("registry")  # in a client-only install
    "needs the 'registry' extra (fastapi, uvicorn, sqlalchemy, alembic, prometheus_client, jinja2 are missing): pip install 'gc-fabric[registry]'"
    """
    missing = [module for module in EXTRA_MODULES[extra] if find_spec(module) is None]
    if not missing:
        return None
    verb = "is" if len(missing) == 1 else "are"
    return (f"needs the {extra!r} extra ({', '.join(missing)} {verb} missing): "
            f"pip install 'gc-fabric[{extra}]'")
