"""The registry's OpenAPI document shows an integrator an example of every answer they need,
and each example is a valid answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest

from gc_core.registry.app import RegistrySettings, create_app

#: What docs/integration.md walks through: log in, endpoints and their status, functions,
#: a task's state and result.
INTEGRATOR_ANSWERS = [("get", "/whoami"), ("post", "/tokens"), ("get", "/endpoints"),
                      ("get", "/endpoints/{endpoint_id}"), ("get", "/endpoints/{endpoint_id}/status"),
                      ("get", "/endpoints/{endpoint_id}/functions"),
                      ("get", "/functions/{function_id}"), ("get", "/tasks/{task_id}")]


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder: Path = tmp_path_factory.mktemp("registry")
    app = create_app(RegistrySettings(db_url=f"sqlite:///{folder / 'r.db'}", ledger=False))
    document: dict[str, Any] = app.openapi()
    return document


def _answer_schema(openapi: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    schema: dict[str, Any] = openapi["paths"][path][method]["responses"]["200"]["content"][
        "application/json"]["schema"]
    item: dict[str, Any] = schema.get("items", schema)  # a list: examples of its items
    return item


@pytest.mark.parametrize(("method", "path"), INTEGRATOR_ANSWERS)
def test_each_answer_an_integrator_needs_has_a_valid_example(
        openapi: dict[str, Any], method: str, path: str) -> None:
    reference = _answer_schema(openapi, method, path)["$ref"]
    component = openapi["components"]["schemas"][reference.rsplit("/", 1)[1]]
    assert component.get("examples"), f"{method.upper()} {path}: no example for {reference}"
    for example in component["examples"]:
        jsonschema.Draft202012Validator({**openapi, "$ref": reference}).validate(example)


def test_a_function_says_that_it_takes_json_calls(openapi: dict[str, Any]) -> None:
    function = openapi["components"]["schemas"]["FunctionOut"]
    assert "JSON calls" in function["description"]
    assert "minor version" in function["properties"]["python_version"]["description"]
