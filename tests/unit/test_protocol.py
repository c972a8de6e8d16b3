"""The wire contract: models to AMQP envelopes and back, with plain data only."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gc_core.errors import ProtocolError
from gc_core.protocol import (
    PROTOCOL_VERSION,
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
    error_result,
)


def a_task(**overrides: Any) -> TaskMessage:
    fields: dict[str, Any] = {
        "task_id": "task-1",
        "task_group_id": "group-1",
        "endpoint_id": "ep-1",
        "function_id": "fn-1",
        "user": "alice",
        "content_type": "application/json",
        "payload": b'{"args":[1,2],"kwargs":{}}',
        "resource_spec": {"num_nodes": 2, "partition": "debug", "exclusive": True},
        "sender_python": "3.11.7",
        "sender_serializer": "json 1",
    }
    fields.update(overrides)
    return TaskMessage(**fields)


def with_headers(envelope: Envelope, **changes: Any) -> Envelope:
    """A copy of ``envelope`` whose headers are changed; a value of None removes the header."""
    headers = dict(envelope.headers)
    for field_name, value in changes.items():
        name = field_name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return Envelope(envelope.message_id, envelope.correlation_id, envelope.content_type,
                    headers, envelope.body)


# -- tasks -------------------------------------------------------------------------------


def test_a_task_survives_encode_and_decode_with_every_field() -> None:
    task = a_task()

    decoded = decode_task(encode_task(task))

    assert decoded == task
    assert decoded.resource_spec == {"num_nodes": 2, "partition": "debug", "exclusive": True}
    assert decoded.protocol == PROTOCOL_VERSION


def test_encode_task_puts_ids_in_amqp_properties_and_the_rest_in_headers() -> None:
    envelope = encode_task(a_task())

    assert envelope.message_id == "task-1"
    assert envelope.correlation_id == "group-1"
    assert envelope.content_type == "application/json"
    assert envelope.body == b'{"args":[1,2],"kwargs":{}}'
    assert envelope.headers["gc-protocol"] == PROTOCOL_VERSION
    assert envelope.headers["gc-user"] == "alice"
    assert envelope.headers["gc-endpoint-id"] == "ep-1"
    assert envelope.headers["gc-function-id"] == "fn-1"
    assert json.loads(envelope.headers["gc-resource-spec"]) == a_task().resource_spec


def test_a_task_without_resource_spec_has_no_resource_spec_header_and_decodes_to_empty() -> None:
    envelope = encode_task(a_task(resource_spec={}))

    assert "gc-resource-spec" not in envelope.headers
    assert decode_task(envelope).resource_spec == {}


def test_decode_task_rejects_a_message_without_protocol_header() -> None:
    envelope = with_headers(encode_task(a_task()), gc_protocol=None)

    with pytest.raises(ProtocolError, match="gc-protocol") as info:
        decode_task(envelope)

    assert info.value.raw == envelope.body


def test_decode_task_rejects_a_message_from_a_newer_protocol_version() -> None:
    envelope = with_headers(encode_task(a_task()), gc_protocol=PROTOCOL_VERSION + 1)

    with pytest.raises(ProtocolError, match="upgrade") as info:
        decode_task(envelope)

    assert str(PROTOCOL_VERSION + 1) in str(info.value)
    assert info.value.raw == envelope.body


def test_decode_task_rejects_a_message_without_user_header() -> None:
    envelope = with_headers(encode_task(a_task()), gc_user=None)

    with pytest.raises(ProtocolError, match="user") as info:
        decode_task(envelope)

    assert info.value.raw == envelope.body


@pytest.mark.parametrize(("header", "field"), [("gc-user", "user"), ("gc-endpoint-id", "endpoint_id"),
                                               ("gc-function-id", "function_id"),
                                               ("gc-python", "sender_python")])
def test_decode_task_rejects_a_header_that_is_not_a_string(header: str, field: str) -> None:
    envelope = encode_task(a_task())
    envelope.headers[header] = 42

    with pytest.raises(ProtocolError, match=f"{field}: Input should be a valid string") as info:
        decode_task(envelope)

    assert info.value.raw == envelope.body


def test_a_text_header_that_is_no_utf8_is_read_with_replacement_characters() -> None:
    # pika hands back as bytes a long string it cannot decode as UTF-8
    task = encode_task(a_task())
    task.headers["gc-python"] = b"3.11\xff"
    result = encode_result(a_result())
    result.headers["gc-worker"] = b"host\xfe:1"

    assert decode_task(task).sender_python == "3.11\ufffd"
    assert decode_result(result).worker == "host\ufffd:1"


def test_decode_task_rejects_a_resource_spec_that_is_not_json() -> None:
    envelope = with_headers(encode_task(a_task()), gc_resource_spec="{not json")

    with pytest.raises(ProtocolError) as info:
        decode_task(envelope)

    assert info.value.raw == envelope.body


def test_decode_task_accepts_header_values_given_as_bytes_as_pika_hands_them_back() -> None:
    task = a_task()
    envelope = encode_task(task)
    as_bytes = {name: value.encode() if isinstance(value, str) else value
                for name, value in envelope.headers.items()}

    decoded = decode_task(Envelope(envelope.message_id, envelope.correlation_id,
                                   envelope.content_type, as_bytes, envelope.body))

    assert decoded == task


def test_decode_task_takes_the_task_group_from_the_header_when_correlation_id_is_empty() -> None:
    envelope = encode_task(a_task())

    decoded = decode_task(Envelope(envelope.message_id, "", envelope.content_type,
                                   envelope.headers, envelope.body))

    assert decoded.task_group_id == "group-1"


# -- results -----------------------------------------------------------------------------

TIMINGS = Timings(received=1_700_000_000.123456, started=1_700_000_000.5, finished=1_700_000_001.987654)


def a_result(**overrides: Any) -> ResultMessage:
    fields: dict[str, Any] = {
        "task_id": "task-1", "task_group_id": "group-1", "endpoint_id": "ep-1", "function_id": "fn-1",
        "user": "alice", "state": "success", "content_type": "application/vnd.gc.cloudpickle",
        "payload": b"\x80\x05K*.", "timings": TIMINGS, "worker": "node1:1234",
        "sender_python": "3.11.7", "sender_serializer": "cloudpickle 3.1.3"}
    fields.update(overrides)
    return ResultMessage(**fields)


def assert_timings_close(got: Timings, want: Timings) -> None:
    for name in ("received", "started", "finished"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), abs=1e-6), name


def test_a_successful_result_survives_encode_and_decode() -> None:
    result = a_result()

    decoded = decode_result(encode_result(result))

    assert decoded.model_dump(exclude={"timings"}) == result.model_dump(exclude={"timings"})
    assert_timings_close(decoded.timings, result.timings)


def test_a_failed_result_survives_encode_and_decode_with_its_error() -> None:
    error = ErrorInfo(type="ZeroDivisionError", message="division by zero",
                      traceback='Traceback (most recent call last):\n  File "x.py"\n')
    result = error_result(a_task(), error, timings=TIMINGS, worker="node1:1234")

    decoded = decode_result(encode_result(result))

    assert decoded.state == "failed"
    assert decoded.error == error
    assert decoded.payload == b""
    assert decoded.model_dump(exclude={"timings"}) == result.model_dump(exclude={"timings"})


def test_an_error_travels_as_a_json_body() -> None:
    error = ErrorInfo(type="ValueError", message="bad", traceback="tb")

    envelope = encode_result(a_result(state="failed", error=error, payload=b""))

    assert envelope.content_type == "application/json"
    assert json.loads(envelope.body) == {"type": "ValueError", "message": "bad", "traceback": "tb"}
    assert envelope.headers["gc-state"] == "failed"


def test_timings_travel_as_integer_microsecond_headers() -> None:
    envelope = encode_result(a_result())

    for name in ("gc-received", "gc-started", "gc-finished"):
        assert type(envelope.headers[name]) is int
    assert envelope.headers["gc-received"] == 1_700_000_000_123_456
    assert envelope.headers["gc-finished"] == 1_700_000_001_987_654


def test_timings_come_back_as_float_seconds_within_a_microsecond() -> None:
    decoded = decode_result(encode_result(a_result()))

    assert isinstance(decoded.timings.received, float)
    assert_timings_close(decoded.timings, TIMINGS)


def test_missing_timings_are_not_sent_and_come_back_as_none() -> None:
    envelope = encode_result(a_result(timings=Timings(started=1.5)))

    assert "gc-received" not in envelope.headers
    assert decode_result(envelope).timings == Timings(started=1.5)


def test_decode_result_rejects_a_failed_result_whose_body_is_not_an_error() -> None:
    envelope = with_headers(encode_result(a_result()), gc_state="failed")

    with pytest.raises(ProtocolError, match="malformed result") as info:
        decode_result(envelope)

    assert info.value.raw == envelope.body


def test_decode_result_rejects_an_unknown_state() -> None:
    envelope = with_headers(encode_result(a_result()), gc_state="exploded")

    with pytest.raises(ProtocolError):
        decode_result(envelope)


def test_decode_result_rejects_a_message_without_protocol_header() -> None:
    envelope = with_headers(encode_result(a_result()), gc_protocol=None)

    with pytest.raises(ProtocolError, match="gc-protocol"):
        decode_result(envelope)


# -- dead letters ------------------------------------------------------------------------


def dead_lettered(reason: str = "delivery_limit", extra: dict[str, Any] | None = None) -> Envelope:
    task = encode_task(a_task())
    headers = dict(task.headers)
    headers["x-death"] = [{"reason": reason, "queue": "gc.ep.X.tasks"}]
    headers.update(extra or {})
    return Envelope(task.message_id, task.correlation_id, task.content_type, headers, task.body)


def test_a_task_dead_lettered_at_the_delivery_limit_decodes_to_a_failed_result() -> None:
    result = decode_result(dead_lettered(extra={"x-delivery-count": 5}))

    assert result.state == "failed"
    assert result.task_id == "task-1"
    assert result.task_group_id == "group-1"
    assert result.user == "alice"
    assert result.endpoint_id == "ep-1"
    assert result.function_id == "fn-1"
    assert result.error is not None
    assert result.error.type == "TaskDeadLettered"
    assert "delivery limit" in result.error.message
    assert "gc.ep.X.tasks" in result.error.message
    assert "5 times" in result.error.message


def test_a_task_dead_lettered_for_another_reason_names_the_reason() -> None:
    result = decode_result(dead_lettered(reason="rejected"))

    assert result.error is not None
    assert result.error.type == "TaskDeadLettered"
    assert "rejected" in result.error.message
    assert "delivery limit" not in result.error.message


def test_a_dead_letter_whose_x_death_values_are_bytes_still_decodes() -> None:
    envelope = dead_lettered()
    envelope.headers["x-death"] = [{"reason": b"delivery_limit", "queue": b"gc.ep.X.tasks"}]

    result = decode_result(envelope)

    assert result.error is not None
    assert "delivery limit" in result.error.message
    assert "gc.ep.X.tasks" in result.error.message


# -- events ------------------------------------------------------------------------------


def test_a_heartbeat_survives_encode_and_decode() -> None:
    heartbeat = Heartbeat(endpoint_id="ep-1", hostname="node1", pid=42, sent=100.5, period=10.0,
                          started=50.0, engine="processes", workers=4, workers_busy=1,
                          tasks_received=10, tasks_succeeded=8, tasks_failed=1, queue_depth=3)

    envelope = encode_event(heartbeat)

    assert envelope.headers["gc-event"] == "heartbeat"
    assert decode_event(envelope) == heartbeat


def test_a_heartbeat_far_larger_than_any_agent_sends_is_refused() -> None:
    # An agent's heartbeat is a few hundred bytes of counts. The registry keeps the last of
    # each agent of an endpoint (64) and reads them all for every status, the dashboard's
    # list of endpoints too: 8 MiB ones would make that 512 MiB an endpoint.
    heartbeat = Heartbeat(endpoint_id="ep-1", hostname="node1", pid=42, sent=100.5, period=10.0,
                          started=50.0, engine="processes", workers=4, workers_busy=1,
                          tasks_received=10, tasks_succeeded=8, tasks_failed=1,
                          engine_status={"padding": "x" * 100_000})

    with pytest.raises(ProtocolError, match=r"heartbeat event of 100,\d+ bytes is over the 16,384-byte bound"):
        decode_event(encode_event(heartbeat))


def test_a_group_manifest_survives_encode_and_decode() -> None:
    manifest = GroupManifest(task_group_id="group-1", endpoint_id="ep-1", user="alice",
                             task_ids=["t1", "t2", "t3"], submitted=123.25)

    envelope = encode_event(manifest)

    assert envelope.headers["gc-event"] == "group-manifest"
    assert decode_event(envelope) == manifest


def test_decode_event_accepts_the_event_kind_as_bytes() -> None:
    manifest = GroupManifest(task_group_id="g", endpoint_id="e", user="u", task_ids=[],
                             submitted=1.0)
    envelope = encode_event(manifest)

    decoded = decode_event(with_headers(envelope, gc_event=b"group-manifest"))

    assert decoded == manifest


def test_decode_event_rejects_an_unknown_event_kind() -> None:
    envelope = Envelope("", "", "application/json", {"gc-protocol": 1, "gc-event": "party"}, b"{}")

    with pytest.raises(ProtocolError, match="party") as info:
        decode_event(envelope)

    assert info.value.raw == b"{}"


def test_decode_event_rejects_a_heartbeat_with_a_malformed_body() -> None:
    envelope = Envelope("", "", "application/json", {"gc-protocol": 1, "gc-event": "heartbeat"},
                        b'{"endpoint_id": "ep-1"}')

    with pytest.raises(ProtocolError, match="malformed heartbeat") as info:
        decode_event(envelope)

    assert info.value.raw == b'{"endpoint_id": "ep-1"}'
