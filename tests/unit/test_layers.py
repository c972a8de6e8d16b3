"""The packages keep their layers: who may import whom (docs/architecture.md).

- ``gc_client`` may import ``gc_core`` but not its service package ``gc_core.registry``,
  and never ``gc_agent``;
- ``gc_agent`` may import ``gc_core`` but not ``gc_core.registry``, and never ``gc_client``;
- ``gc_core`` outside the service imports neither ``gc_agent``, ``gc_client`` nor
  ``gc_core.registry``;
- the service (``gc_core.registry``) may import the rest of ``gc_core``.

Every import counts, at module level or inside a function, because a function-level import
still ties the packages together at run time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: The repository's root: the three packages are folders in it.
ROOT = Path(__file__).resolve().parents[2]
#: The packages whose imports are checked.
PACKAGES = ("gc_core", "gc_agent", "gc_client")
#: The registry service: web server, ORM and migrations live here and only here.
SERVICE = "gc_core.registry"
#: Third-party packages a client-only install must not load on ``import gc_client``.
HEAVY = ("fastapi", "starlette", "sqlalchemy", "alembic", "uvicorn", "parsl", "jinja2")


@dataclass(frozen=True)
class Arrow:
    """One import: the file and line it is on, the importing module and what it imports."""

    path: Path
    line: int
    importer: str
    imported: str


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def broken_rule(importer: str, imported: str) -> str | None:
    """The layering rule an import breaks, or None when it is allowed."""
    if _within(importer, "gc_client"):
        if _within(imported, "gc_agent"):
            return "gc_client never imports gc_agent"
        if _within(imported, SERVICE):
            return "gc_client imports the registry's contract, never its service gc_core.registry"
    elif _within(importer, "gc_agent"):
        if _within(imported, "gc_client"):
            return "gc_agent never imports gc_client"
        if _within(imported, SERVICE):
            return "gc_agent imports the registry's contract, never its service gc_core.registry"
    elif _within(importer, "gc_core") and not _within(importer, SERVICE):
        for package in ("gc_agent", "gc_client", SERVICE):
            if _within(imported, package):
                return f"gc_core outside the registry service never imports {package}"
    elif _within(importer, SERVICE):
        for package in ("gc_agent", "gc_client"):
            if _within(imported, package):
                return f"the registry service imports only gc_core, never {package}"
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module an ``import from`` names, relative ones included."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def arrows(path: Path, source: str, importer: str) -> Iterator[Arrow]:
    """Every import in a module's source, wherever in the module it is."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Arrow(path, node.lineno, importer, alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node, importer, is_package)
            yield Arrow(path, node.lineno, importer, module)
            # ``from gc_core import registry`` imports the submodule gc_core.registry.
            for alias in node.names:
                yield Arrow(path, node.lineno, importer, f"{module}.{alias.name}")


def _sources() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def _file_arrows(path: Path) -> Iterator[Arrow]:
    return arrows(path, path.read_text(), _module_name(path))


def test_the_rules_tell_allowed_arrows_from_broken_ones() -> None:
    assert broken_rule("gc_client.client", "gc_core.registry_api.client") is None
    assert broken_rule("gc_agent.agent", "gc_core.broker") is None
    assert broken_rule("gc_core.registry.app", "gc_core.registry_api.schemas") is None
    assert broken_rule("gc_client.functions", "gc_agent.execution") is not None
    assert broken_rule("gc_client.client", "gc_core.registry.client") is not None
    assert broken_rule("gc_agent.cli", "gc_core.registry") is not None
    assert broken_rule("gc_agent.cli", "gc_client") is not None
    assert broken_rule("gc_core.protocol", "gc_core.registry.schemas") is not None
    assert broken_rule("gc_core.registry_api.client", "gc_agent.execution") is not None
    assert broken_rule("gc_core.registry.app", "gc_client.client") is not None
    assert broken_rule("gc_core.registry_api", "gc_core.registry") is not None
    assert broken_rule("gc_core.registry_api", "gc_core.registry_apis") is None


def test_the_walk_finds_every_kind_of_import_and_where_it_is() -> None:
    source = (
        "import gc_core.protocol\n"
        "from gc_core import registry\n"
        "from ..registry_api import schemas\n"
        "def run():\n"
        "    from gc_agent.execution import run_job\n"
        "class Late:\n"
        "    def __call__(self):\n"
        "        import gc_client.tasks as tasks\n"
    )

    found = {(arrow.line, arrow.imported)
             for arrow in arrows(Path("gc_core/registry/x.py"), source, "gc_core.registry.x")}

    assert {(1, "gc_core.protocol"), (2, "gc_core.registry"), (3, "gc_core.registry_api.schemas"),
            (5, "gc_agent.execution"), (8, "gc_client.tasks")} <= found


def test_no_module_imports_across_its_layer() -> None:
    # Given every import in every module of the three packages
    sources = _sources()
    assert len(sources) > 50, "the walk found too few modules: is ROOT right?"

    # When each is checked against the rules (one report per import statement)
    violations: dict[tuple[Path, int], str] = {}
    for arrow in (arrow for path in sources for arrow in _file_arrows(path)):
        rule = broken_rule(arrow.importer, arrow.imported)
        if rule is not None:
            violations.setdefault((arrow.path, arrow.line),
                                  f"{arrow.path.relative_to(ROOT)}:{arrow.line}: {arrow.importer} "
                                  f"imports {arrow.imported} ({rule})")

    # Then none breaks one
    assert list(violations.values()) == [], "layering broken:\n" + "\n".join(violations.values())


@pytest.mark.timeout(60)
def test_importing_the_client_loads_no_web_server_orm_or_parsl() -> None:
    script = "import gc_client, sys; print(sorted(sys.modules))"

    loaded = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                            text=True, cwd=ROOT).stdout
    modules: list[str] = ast.literal_eval(loaded)

    heavy = sorted(name for name in modules if name.split(".")[0] in HEAVY)
    assert heavy == [], f"import gc_client loads {heavy}"
