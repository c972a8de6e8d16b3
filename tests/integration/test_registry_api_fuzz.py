"""Bad input, generated from the registry's own OpenAPI document (schemathesis).

Every operation gets valid and malformed requests; none may answer with a server error,
and every refusal must say why in its ``detail``. Examples are derandomized, so a failure
reproduces on the next run.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import BaseSchema, Case, CheckContext, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from gc_core.registry import identity
from tests.integration.conftest import OwnRegistry

#: Examples per operation and mode: the whole module stays well under a minute.
#: GC_FUZZ_API_EXAMPLES raises it (tests/security/fuzz_report.py, for the README's figures).
EXAMPLES = int(os.environ.get("GC_FUZZ_API_EXAMPLES") or 25)
#: Requests this module sent, by generation mode: fuzz_report.py prints them.
REQUESTS: Counter[str] = Counter()


def refusal_says_why(_ctx: CheckContext, response: Response, _case: Case) -> bool | None:
    """A 4xx answer carries a ``detail`` sentence saying why."""
    if not 400 <= response.status_code < 500:
        return None
    detail = response.json().get("detail")
    assert isinstance(detail, str) and detail.strip(), \
        f"{response.status_code} without a reason: {response.text[:200]!r}"
    return None


CHECKS = [not_a_server_error, refusal_says_why]


@pytest.fixture(scope="module")
def open_schema(own_registry: OwnRegistry, tmp_path_factory: pytest.TempPathFactory) -> BaseSchema:
    """The OpenAPI schema of a registry in open mode (the demo's)."""
    db = tmp_path_factory.mktemp("fuzz-open") / "registry.db"
    server, _ = own_registry(f"sqlite:///{db}", "open")
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


@pytest.fixture(scope="module")
def token_registry(own_registry: OwnRegistry, tmp_path_factory: pytest.TempPathFactory
                   ) -> tuple[BaseSchema, str]:
    """The schema of a registry that checks tokens, and an administrator's token."""
    db_url = f"sqlite:///{tmp_path_factory.mktemp('fuzz-tokens') / 'registry.db'}"
    server, _ = own_registry(db_url, "tokens")
    engine = create_engine(db_url)
    with Session(engine) as db:
        identity.create_user(db, "root", admin=True)
        token = identity.issue_token(db, "root").token
    engine.dispose()
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json"), token


def _fuzz(schema: BaseSchema, mode: GenerationMode, examples: int,
          headers: dict[str, str] | None = None) -> list[str]:
    """Run every operation's examples; the failures, one line each (hypothesis shrinks them)."""
    failures = []
    for found in schema.get_all_operations():
        operation = found.ok()

        @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
        @given(case=operation.as_strategy(mode))
        def check(case: Case) -> None:
            REQUESTS[mode.value] += 1
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            check()
        except Unsatisfiable:  # nothing to malform: an operation without parameters or body
            continue
        except Exception as exc:  # noqa: BLE001 - every operation gets its turn
            failures.append(f"{operation.label}: {str(exc).strip()[:2000]}")
    return failures


MODES = pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)


@MODES
def test_an_open_registry_answers_any_request_without_a_server_error(
        open_schema: BaseSchema, mode: GenerationMode) -> None:
    failures = _fuzz(open_schema, mode, EXAMPLES)
    assert not failures, "\n\n".join(failures)


@MODES
def test_a_token_registry_answers_an_administrator_without_a_server_error(
        token_registry: tuple[BaseSchema, str], mode: GenerationMode) -> None:
    schema, token = token_registry
    failures = _fuzz(schema, mode, EXAMPLES, headers={"Authorization": f"Bearer {token}"})
    assert not failures, "\n\n".join(failures)


def test_a_token_registry_refuses_anonymous_requests_saying_why(
        token_registry: tuple[BaseSchema, str]) -> None:
    failures = _fuzz(token_registry[0], GenerationMode.POSITIVE, 5)
    assert not failures, "\n\n".join(failures)
