"""Services in Node.js and Go call registered functions from the contract alone (the local stack)."""

from __future__ import annotations

import json
import math
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from gc_client import Client
from tests.fabric import Endpoint, Fabric
from tests.integration.test_raw_amqp import weighted_sum
from tests.other_languages import LANGUAGES, ExampleClients
from tests.toolchains import node_modules

#: Declares one result queue with x-expires as each AMQP type given (amqplib's typed values),
#: and prints what the broker said to each.
REDECLARE_SCRIPT = """
const amqp = require('amqplib');
(async () => {
  const connection = await amqp.connect(process.argv[1]);
  const answers = {};
  for (const type of JSON.parse(process.argv[3])) {
    const channel = await connection.createChannel();
    channel.on('error', () => {});
    const expires = type === 'string' ? '604800000' : { '!': type, value: 604800000 };
    answers[type] = await channel.assertQueue(process.argv[2], { durable: true,
      arguments: { 'x-queue-type': 'quorum', 'x-expires': expires } })
      .then(() => channel.close()).then(() => 'ok', (err) => String(err.code));
  }
  console.log(JSON.stringify(answers));
  await connection.close();
})();
"""


def python_value(kind: str, argument: Any = None) -> Any:
    """What a function may return, by name, to see how it travels as JSON."""
    values: dict[str, Any] = {
        "tuple": (1, "a"), "big-int": 2**64 + 1, "int-keys": {1: "a", 2.5: "b"},
        "nan": float("nan"), "set": {1, 2}, "bytes": b"x", "is-nan": argument is not None
        and math.isnan(argument)}
    return values[kind]


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> ExampleClients:
    return ExampleClients(tmp_path_factory.mktemp("example-clients"))


@pytest.fixture(scope="module")
def functions(fabric: Fabric) -> Iterator[dict[str, str]]:
    with Client(broker_url=fabric.broker_url, registry_url=fabric.registry_url,
                home=str(fabric.home)) as client:
        yield {"weighted_sum": client.register_function(weighted_sum),
               "python_value": client.register_function(python_value)}


@pytest.mark.parametrize("language", LANGUAGES)
def test_json_calls_come_back_matched_to_their_task_ids_with_errors_as_json(
        language: str, clients: ExampleClients, fabric: Fabric, endpoint: Endpoint,
        functions: dict[str, str]) -> None:
    # When the client submits three calls at once, the second of which raises
    run = clients.run(language, fabric.broker_url, endpoint.endpoint_id,
                      functions["weighted_sum"], {"args": [[1, 2, 3.5]], "kwargs": {"weight": 2}},
                      {"args": ["not a list"]}, {"args": [[4, 5]]})
    # Then each call gets its own outcome, in order, under its own task id
    assert len(run.outcomes) == 3, run.stderr + endpoint.read_logs()[-4000:]
    assert len({o["task_id"] for o in run.outcomes}) == 3
    first, second, third = run.outcomes
    assert (first["state"], first["value"]) == ("success", {"sum": 13.0, "n": 3})
    assert (third["state"], third["value"]) == ("success", {"sum": 9, "n": 2})
    # and the error result is the contract's ErrorInfo, with the remote traceback
    assert second["state"] == "failed"
    assert second["error"]["type"] == "TypeError"
    assert "weighted_sum" in second["error"]["traceback"]
    assert run.returncode == 1


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_task_for_an_endpoint_without_a_queue_is_reported_returned(
        language: str, clients: ExampleClients, fabric: Fabric,
        functions: dict[str, str]) -> None:
    run = clients.run(language, fabric.broker_url, f"no-such-endpoint-{uuid.uuid4().hex[:8]}",
                      functions["weighted_sum"], {"args": [[1]]})
    # The broker's basic.return arrived before its basic.ack: the client knew not to wait
    assert [o["state"] for o in run.outcomes] == ["returned"], run.stderr
    assert run.returncode == 1


def test_python_values_map_to_json_as_the_contract_says(
        clients: ExampleClients, fabric: Fabric, endpoint: Endpoint,
        functions: dict[str, str]) -> None:
    # The Go client passes result bodies through untouched: these are the agent's own bytes
    kinds = ["tuple", "big-int", "int-keys", "nan", "set", "bytes"]
    run = clients.run("go", fabric.broker_url, endpoint.endpoint_id, functions["python_value"],
                      *({"args": [kind]} for kind in kinds),
                      {"args": ["is-nan", float("nan")]})
    by_kind = dict(zip([*kinds, "nan-argument"], run.outcomes, strict=True))
    assert by_kind["tuple"]["value"] == [1, "a"]
    assert by_kind["big-int"]["value"] == 18446744073709551617  # exact, past 2^53
    assert by_kind["int-keys"]["value"] == {"1": "a", "2.5": "b"}
    for kind in ("nan", "set", "bytes"):
        assert by_kind[kind]["state"] == "failed"
        assert by_kind[kind]["error"]["type"] == "ResultNotSerializable"
    # NaN in a task body is read (Python's extension to JSON), as the contract warns
    assert by_kind["nan-argument"]["value"] is True


def test_a_result_queue_redeclared_with_x_expires_of_another_integer_width_is_the_same_queue(
        fabric: Fabric) -> None:
    # Given a result queue declared with x-expires as a signed 32-bit integer, when it is
    # declared again with other types: integers of any width match, a float or string not
    queue = f"gc.results.widths.{uuid.uuid4().hex[:8]}"
    types = ["int", "long", "double", "string"]
    done = subprocess.run(["node", "-e", REDECLARE_SCRIPT, fabric.broker_url, queue,
                           json.dumps(types)], env={"NODE_PATH": str(node_modules()),
                                                    "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout) == {"int": "ok", "long": "ok",
                                       "double": "406", "string": "406"}, done.stderr
