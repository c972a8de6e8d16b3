"""Bad input gets a clear error result and never takes the agent down."""

from __future__ import annotations

import uuid
from typing import Any

import cloudpickle
import pika
import pytest

from gc_client import Client, Executor
from gc_core.protocol import Envelope, ResultMessage, decode_result
from gc_core.serialize import PYTHON_VERSION
from tests.fabric import Endpoint, Fabric

USER = "badinput"


def echo(x: Any) -> Any:
    return x


@pytest.fixture
def raw_channel(fabric: Fabric) -> Any:
    """A raw pika channel with a result queue of its own, bound as topology.yaml says."""
    connection = pika.BlockingConnection(pika.URLParameters(fabric.broker_url))
    channel = connection.channel()
    group = uuid.uuid4().hex
    queue = f"gc.results.{USER}.{group}"
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum",
                                                          "x-expires": 604800000})
    channel.queue_bind(queue, "gc.results", f"{USER}.{group}")
    channel.confirm_delivery()
    yield channel, queue, group
    channel.queue_delete(queue)
    connection.close()


@pytest.fixture
def echo_id(client: Client) -> str:
    return client.register_function(echo)


def _send_and_receive(raw: Any, endpoint: Endpoint, function_id: str, *, headers: dict[str, Any],
                      body: bytes, content_type: str) -> ResultMessage:
    channel, queue, group = raw
    task_id = str(uuid.uuid4())
    base = {"gc-protocol": 1, "gc-user": USER, "gc-task-group": group,
            "gc-endpoint-id": endpoint.endpoint_id, "gc-function-id": function_id}
    channel.basic_publish("gc.tasks", endpoint.endpoint_id, body, pika.BasicProperties(
        message_id=task_id, correlation_id=group, content_type=content_type,
        headers={**base, **headers}, delivery_mode=2), mandatory=True)
    for method, props, payload in channel.consume(queue, inactivity_timeout=60):
        assert method is not None, "no result within 60 s"
        channel.basic_ack(method.delivery_tag)
        channel.cancel()
        result = decode_result(Envelope(props.message_id, props.correlation_id,
                                        props.content_type, props.headers or {}, payload))
        assert result.task_id == task_id
        return result
    raise AssertionError("unreachable")


def test_a_malformed_body_gets_a_clear_error(echo_id: str, raw_channel: Any,
                                            endpoint: Endpoint) -> None:
    result = _send_and_receive(raw_channel, endpoint, echo_id, headers={}, body=b"\x00not a pickle",
                               content_type="application/vnd.gc.cloudpickle")
    assert result.state == "failed" and result.error is not None
    assert result.error.type == "SerializationError"
    assert "cannot decode the task's arguments as cloudpickle" in result.error.message


def test_a_message_without_protocol_header_gets_a_protocol_error(echo_id: str, raw_channel: Any,
                                                                 endpoint: Endpoint) -> None:
    result = _send_and_receive(raw_channel, endpoint, echo_id, headers={"gc-protocol": "one"}, body=b"{}",
                               content_type="application/json")
    assert result.error is not None and result.error.type == "ProtocolError"
    assert "gc-protocol" in result.error.message


def test_an_unknown_serializer_is_named_with_the_known_ones(echo_id: str, raw_channel: Any,
                                                            endpoint: Endpoint) -> None:
    result = _send_and_receive(raw_channel, endpoint, echo_id, headers={}, body=b"...",
                               content_type="application/x-msgpack")
    assert result.error is not None and result.error.type == "UnknownSerializer"
    assert "application/x-msgpack" in result.error.message
    assert "application/json" in result.error.message


def test_a_python_version_mismatch_names_both_versions(echo_id: str, raw_channel: Any,
                                                       endpoint: Endpoint) -> None:
    body = cloudpickle.dumps(((1,), {}))
    result = _send_and_receive(raw_channel, endpoint, echo_id, headers={"gc-python": "3.6.15"},
                               body=body, content_type="application/vnd.gc.cloudpickle")
    assert result.error is not None and result.error.type == "VersionMismatch"
    assert "3.6.15" in result.error.message and PYTHON_VERSION in result.error.message


def test_a_cloudpickle_version_mismatch_names_both_versions(echo_id: str, raw_channel: Any,
                                                            endpoint: Endpoint) -> None:
    result = _send_and_receive(
        raw_channel, endpoint, echo_id, headers={"gc-python": PYTHON_VERSION,
                                        "gc-serializer": "cloudpickle 0.5.0"},
        body=b"\x80\x05garbage from an old cloudpickle",
        content_type="application/vnd.gc.cloudpickle")
    assert result.error is not None and result.error.type == "VersionMismatch"
    assert "cloudpickle 0.5.0" in result.error.message
    assert f"cloudpickle {cloudpickle.__version__}" in result.error.message


def test_the_agent_keeps_serving_after_bad_input(echo_id: str, raw_channel: Any, client: Client,
                                                 endpoint: Endpoint) -> None:
    _send_and_receive(raw_channel, endpoint, echo_id, headers={}, body=b"\xff",
                      content_type="application/json")
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        assert ex.submit(echo, "still here").result(timeout=60) == "still here"
    assert endpoint.processes[-1].poll() is None
