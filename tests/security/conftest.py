"""Attacks by users with ordinary accounts, on one private secured node shared by this package.

Every test here is written as the attack: it fails while the hole is open. Tests create
endpoints, groups and ids of their own (``uuid``), so they do not see each other's traffic.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.secured_broker import Secured, secured_world


@pytest.fixture(scope="package")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    with secured_world(tmp_path_factory.mktemp("security")) as world:
        yield world
