"""Other services integrate with nothing but an AMQP client: JSON in, JSON out."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from gc_client import Client
from tests.fabric import Endpoint, Fabric, rabbitmqctl

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "raw_amqp_client.py"


def weighted_sum(values: list[float], weight: float = 1.0) -> dict[str, float]:
    return {"sum": weight * sum(values), "n": len(values)}


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("raw_amqp_client", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_raw_client_imports_nothing_from_gc_fabric() -> None:
    tree = ast.parse(EXAMPLE.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"gc_core", "gc_client", "gc_agent"}


def test_a_json_task_published_with_raw_pika_gets_a_json_result(
        fabric: Fabric, client: Client, endpoint: Endpoint) -> None:
    function_id = client.register_function(weighted_sum)
    raw = _load_example()
    outcome = raw.call(fabric.broker_url, endpoint.endpoint_id, function_id, [[1, 2, 3.5]],
                       {"weight": 2}, user="gateway", timeout=60)
    assert outcome["state"] == "success"
    assert outcome["value"] == {"sum": 13.0, "n": 3}


def test_a_remote_error_reaches_the_raw_client_as_json(
        fabric: Fabric, client: Client, endpoint: Endpoint) -> None:
    function_id = client.register_function(weighted_sum)
    outcome = _load_example().call(fabric.broker_url, endpoint.endpoint_id, function_id,
                                   ["not a list"], {}, user="gateway", timeout=60)
    assert outcome["state"] == "failed"
    assert outcome["error"]["type"] == "TypeError"
    assert "weighted_sum" in outcome["error"]["traceback"]


def test_the_raw_client_command_line_prints_the_value(
        fabric: Fabric, client: Client, endpoint: Endpoint) -> None:
    function_id = client.register_function(weighted_sum)
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--broker-url", fabric.broker_url, "--endpoint",
         endpoint.endpoint_id, "--function", function_id, "[4, 5]"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"sum": 9' in done.stdout


def test_a_dead_lettered_task_reaches_the_raw_client_as_a_failed_result_through_the_ledger(
        fabric: Fabric, client: Client, make_endpoint: Any) -> None:
    # Given an endpoint whose task queue exists but has no agent, and whose tasks expire at
    # once (a policy TTL), so the broker dead-letters them to gc.dead
    ep: Endpoint = make_endpoint()
    function_id = client.register_function(weighted_sum)
    policy = f"expire-{ep.endpoint_id}"
    rabbitmqctl("set_policy", "-p", fabric.vhost, "--apply-to", "queues", "--priority", "100",
                policy, f"^gc\\.ep\\.{re.escape(ep.endpoint_id)}\\.tasks$", '{"message-ttl": 1}')
    try:
        # When the raw client, bound to gc.results only, calls a function there
        outcome = _load_example().call(fabric.broker_url, ep.endpoint_id, function_id,
                                       [[1, 2]], {}, user="gateway", timeout=60)
    finally:
        rabbitmqctl("clear_policy", "-p", fabric.vhost, policy)
    # Then the session registry's ledger republishes the dead letter as a failed result
    assert outcome["state"] == "failed"
    assert outcome["error"]["type"] == "TaskDeadLettered"
    assert "expired" in outcome["error"]["message"]
