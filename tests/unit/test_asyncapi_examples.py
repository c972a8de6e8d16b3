"""docs/asyncapi.yaml and the code agree: its examples decode with our decoders, our encoders'
messages match its schemas, and the reference AsyncAPI parser finds no error in it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gc_core.protocol import (
    CancelCommand,
    Envelope,
    ErrorInfo,
    GroupManifest,
    Heartbeat,
    ResultMessage,
    TaskMessage,
    Timings,
    decode_event,
    decode_result,
    decode_task,
    encode_event,
    encode_result,
    encode_task,
)
from gc_core.serialize import JSON, SERIALIZERS
from gc_core.topology import load_topology
from tests.toolchains import node_modules

CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"
VALIDATOR = Path(__file__).with_name("validate_asyncapi.js")
#: Messages of the contract whose examples are JSON bodies our decoders read.
DECODERS = {"TaskMessage": decode_task, "ResultMessage": decode_result,
            "Heartbeat": decode_event, "CancelCommand": decode_event,
            "GroupManifest": decode_event}
IDS: dict[str, Any] = {"task_id": "5f0c2d1e-8a4b-4c3d-9e2f-1a2b3c4d5e6f",
                       "task_group_id": "1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed",
                       "endpoint_id": "0f4e2c58-52d4-4b8b-8f3e-9c6a1d2e7b44",
                       "function_id": "7d6a1c1e-3f0b-4c52-9a3e-5d1f0c2b8a11", "user": "raw-service"}


@pytest.fixture(scope="module")
def contract() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(CONTRACT.read_text())
    return document


def _schema_check(contract: dict[str, Any], pointer: str, value: Any) -> None:
    """Validate ``value`` against the schema at ``pointer`` in the contract, its ``$ref``s
    resolved within the contract (the document is the root; draft 7 reads only the ref)."""
    jsonschema.Draft7Validator({**contract, "$ref": pointer}).validate(value)


def _examples() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    messages = yaml.safe_load(CONTRACT.read_text())["components"]["messages"]
    return [(name, example, messages[name]["x-example-properties"][example["name"]])
            for name in DECODERS for example in messages[name].get("examples", [])]


@pytest.mark.parametrize(("message", "example", "properties"), _examples(),
                         ids=lambda value: value if isinstance(value, str) else "")
def test_every_example_message_decodes_with_our_decoders(
        contract: dict[str, Any], message: str, example: dict[str, Any],
        properties: dict[str, Any]) -> None:
    envelope = Envelope(properties["message_id"], properties["correlation_id"],
                        properties["content_type"], example["headers"],
                        json.dumps(example["payload"]).encode())
    decoded = DECODERS[message](envelope)
    if isinstance(decoded, TaskMessage):
        assert (decoded.function_id, decoded.endpoint_id, decoded.user) == (
            example["headers"]["gc-function-id"], example["headers"]["gc-endpoint-id"],
            example["headers"]["gc-user"])
        assert json.loads(decoded.payload) == example["payload"]
    elif isinstance(decoded, ResultMessage):
        assert decoded.state == example["headers"]["gc-state"]
        if decoded.error is None:
            assert json.loads(decoded.payload) == example["payload"]
        else:
            assert decoded.error.model_dump() == example["payload"]
    else:
        assert decoded.model_dump(exclude_defaults=True).items() <= example["payload"].items()
    for key in ("headers", "payload"):
        _schema_check(contract, f"#/components/messages/{message}/{key}", example[key])


def _encoded() -> list[tuple[str, Envelope]]:
    task = TaskMessage(**IDS, content_type=JSON.content_type, payload=b'{"args":[1],"kwargs":{}}',
                       resource_spec={"num_ranks": 2}, sender_serializer=JSON.label)
    timings = Timings(received=1735689600.0, started=1735689600.25, finished=1735689601.5)
    success = ResultMessage(**IDS, state="success", content_type=JSON.content_type,
                            payload=b"[1,2]", timings=timings, worker="node01:42",
                            stdout="hello\n", sender_python="3.11.7", sender_serializer="json 1")
    failed = ResultMessage(**IDS, state="failed", content_type=JSON.content_type,
                           error=ErrorInfo(type="ValueError", message="no", traceback="tb"),
                           timings=timings, worker="node01:42")
    cancelled = ResultMessage(**IDS, state="cancelled", content_type=JSON.content_type,
                              error=ErrorInfo(type="TaskCancelled", message="cancelled"))
    heartbeat = Heartbeat(endpoint_id=IDS["endpoint_id"], hostname="node01", pid=1, sent=2.0,
                          period=10, started=1.0, engine="threads", workers=2, workers_busy=0,
                          tasks_received=0, tasks_succeeded=0, tasks_failed=0)
    manifest = GroupManifest(task_group_id=IDS["task_group_id"], endpoint_id=IDS["endpoint_id"],
                             user=IDS["user"], task_ids=[IDS["task_id"]], submitted=1.0)
    cancel = CancelCommand(task_ids=[IDS["task_id"]], user=IDS["user"], sent=1.0)
    return [("TaskMessage", encode_task(task)), ("ResultMessage", encode_result(success)),
            ("ResultMessage", encode_result(failed)), ("ResultMessage", encode_result(cancelled)),
            ("Heartbeat", encode_event(heartbeat)), ("GroupManifest", encode_event(manifest)),
            ("CancelCommand", encode_event(cancel))]


@pytest.mark.parametrize(("message", "envelope"), _encoded(),
                         ids=lambda value: value if isinstance(value, str) else "")
def test_what_our_encoders_write_matches_the_contracts_schemas(
        contract: dict[str, Any], message: str, envelope: Envelope) -> None:
    base = f"#/components/messages/{message}"
    _schema_check(contract, f"{base}/headers", envelope.headers)
    _schema_check(contract, f"{base}/payload", json.loads(envelope.body))
    declared = contract["components"]["messages"][message]["x-amqp-properties"]
    for name in ("message_id", "correlation_id", "content_type"):
        _schema_check(contract, f"{base}/x-amqp-properties/{name}", getattr(envelope, name))
    assert set(declared) >= {"message_id", "correlation_id", "content_type"}


def test_the_schema_check_refuses_what_the_decoders_refuse(contract: dict[str, Any]) -> None:
    # A gc-protocol sent as a string is a ProtocolError for the agent, and so for the schema
    headers = {**encode_task(TaskMessage(**IDS, content_type=JSON.content_type,
                                         payload=b"{}")).headers, "gc-protocol": "1"}
    with pytest.raises(jsonschema.ValidationError, match="'1' is not of type 'integer'"):
        _schema_check(contract, "#/components/messages/TaskMessage/headers", headers)


def test_the_result_queue_and_content_types_are_the_codes(contract: dict[str, Any]) -> None:
    queue = contract["channels"]["gc.results/{user}.{task_group_id}"]["x-gc-queues"][0]
    declared = load_topology().queue("results", user="u", task_group_id="g")
    assert queue["arguments"] == dict(declared.arguments)
    assert (queue["durable"], queue["exclusive"], queue["autoDelete"]) == (True, False, False)
    task_types = contract["components"]["messages"]["TaskMessage"]["x-amqp-properties"]
    assert set(task_types["content_type"]["enum"]) == set(SERIALIZERS)


def test_the_reference_asyncapi_parser_finds_no_error_in_the_contract() -> None:
    modules = node_modules()
    done = subprocess.run(["node", str(VALIDATOR), str(CONTRACT)], capture_output=True,
                          text=True, timeout=120, env={"NODE_PATH": str(modules),
                                                       "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    errors = [d for d in report["diagnostics"] if d["severity"] == 0]
    assert report["parsed"] and errors == [], json.dumps(errors, indent=1)
