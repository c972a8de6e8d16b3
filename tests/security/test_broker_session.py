"""A message the broker can never take costs its sender an error, never the session.

Real broker (the session's vhost on the local node): each publish below was once able to
kill a BrokerSession's IO thread or make it reconnect and re-send for ever.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest

from gc_core.broker import BrokerSession, Refusal
from gc_core.protocol import Envelope
from gc_core.topology import load_topology
from tests.fabric import Fabric, eventually

TOPOLOGY = load_topology()


class Confirms:
    """Collects on_confirm answers by message id."""

    def __init__(self) -> None:
        self.answers: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def callback(self, message_id: str):  # type: ignore[no-untyped-def]
        def on_confirm(reason: str | None) -> None:
            with self._lock:
                self.answers[message_id] = reason
        return on_confirm

    def wait(self, message_id: str) -> str | None:
        eventually(lambda: message_id in self.answers, 30, f"an answer for {message_id}")
        return self.answers[message_id]


@pytest.fixture
def session(fabric: Fabric) -> Iterator[tuple[BrokerSession, str]]:
    group = f"g-{uuid.uuid4().hex[:8]}"
    queue = TOPOLOGY.queue("results", user="alice", task_group_id=group)
    broker = BrokerSession(fabric.broker_url, name="attack-test", topology=TOPOLOGY,
                           queues=[queue])
    broker.start()
    yield broker, TOPOLOGY.routing_key("result", user="alice", task_group_id=group)
    broker.close()


def _publish(broker: BrokerSession, key: str, confirms: Confirms, message_id: str, *,
             correlation_id: str = "g", headers: dict[str, object] | None = None,
             body: bytes = b"{}") -> None:
    broker.publish(TOPOLOGY.exchange("results"), key,
                   Envelope(message_id, correlation_id, "application/json", headers or {}, body),
                   on_confirm=confirms.callback(message_id))


def _still_serves(broker: BrokerSession, key: str, confirms: Confirms) -> None:
    _publish(broker, key, confirms, "after")
    assert confirms.wait("after") is None, "an ordinary publish after the attack was not confirmed"
    assert broker.io_loop_restarts == 0


def test_a_property_too_long_for_amqp_fails_that_publish_only(session: tuple[BrokerSession, str]) -> None:
    # A correlation id of 300 bytes (a forged task group) cannot be encoded: a short string
    # holds 255. It used to raise on the IO thread, which died with the session still "connected".
    broker, key = session
    confirms = Confirms()
    _publish(broker, key, confirms, "long-group", correlation_id="g" * 300)
    reason = confirms.wait("long-group")
    assert isinstance(reason, Refusal) and "cannot be encoded" in reason
    _still_serves(broker, key, confirms)


def test_headers_larger_than_a_frame_fail_that_publish_without_reconnecting(
        session: tuple[BrokerSession, str], caplog: pytest.LogCaptureFixture) -> None:
    # Headers that do not fit one frame made the broker close the connection; the session
    # reconnected and sent them again, for ever (~1,800 reconnects in 14 s).
    broker, key = session
    confirms = Confirms()
    _publish(broker, key, confirms, "huge-headers", headers={"gc-stdout": "x" * 140_000})
    reason = confirms.wait("huge-headers")
    assert isinstance(reason, Refusal) and "frame" in reason
    _still_serves(broker, key, confirms)
    assert "lost" not in caplog.text and "reconnecting" not in caplog.text


def test_a_message_over_the_size_limit_fails_before_it_is_sent(fabric: Fabric) -> None:
    group = f"g-{uuid.uuid4().hex[:8]}"
    broker = BrokerSession(fabric.broker_url, name="attack-test", topology=TOPOLOGY,
                           queues=[TOPOLOGY.queue("results", user="alice", task_group_id=group)],
                           max_message_size=1000)
    broker.start()
    try:
        key, confirms = TOPOLOGY.routing_key("result", user="alice", task_group_id=group), Confirms()
        _publish(broker, key, confirms, "big", body=b"x" * 1001)
        reason = confirms.wait("big")
        assert isinstance(reason, Refusal) and "1,001 bytes" in reason and "1,000" in reason
        _still_serves(broker, key, confirms)
    finally:
        broker.close()


def test_a_message_the_broker_refuses_as_too_large_is_not_sent_again(
        fabric: Fabric, caplog: pytest.LogCaptureFixture) -> None:
    # The broker's own limit (max_message_size, 128 MiB by default) closes the channel; only
    # that publish fails, the session reconnects once and goes on.
    group = f"g-{uuid.uuid4().hex[:8]}"
    broker = BrokerSession(fabric.broker_url, name="attack-test", topology=TOPOLOGY,
                           queues=[TOPOLOGY.queue("results", user="alice", task_group_id=group)],
                           max_message_size=2**31)
    broker.start()
    try:
        key, confirms = TOPOLOGY.routing_key("result", user="alice", task_group_id=group), Confirms()
        _publish(broker, key, confirms, "too-big", body=bytes(129 * 2**20))
        reason = confirms.wait("too-big")
        assert isinstance(reason, Refusal) and "max size" in reason
        eventually(lambda: broker.connected, 30, "the session to reconnect")
        _still_serves(broker, key, confirms)
        assert caplog.text.count("reconnecting") <= 1
    finally:
        broker.close()


def test_a_callback_error_inside_pika_costs_a_reconnect_not_the_session(
        session: tuple[BrokerSession, str]) -> None:
    # A callback pika runs itself (here: the answer to a queue depth question) that raises
    # drops the connection; the session must come back and go on publishing.
    broker, key = session

    def broken(_count: int) -> None:
        raise RuntimeError("a bug in a callback")

    broker.queue_message_count(TOPOLOGY.queue("ledger").name, broken)
    confirms = Confirms()
    _publish(broker, key, confirms, "after-crash")
    assert confirms.wait("after-crash") is None


def test_an_io_loop_killed_by_an_escaped_error_is_started_again(
        session: tuple[BrokerSession, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault injection into our own code: an error escaping one of the session's timer
    # callbacks ends pika's IO loop. It used to end the IO thread for good, while
    # `connected` still said True and nothing was published or acked any more.
    broker, key = session

    def escaped_bug() -> None:
        raise RuntimeError("a bug that escaped a timer callback")

    monkeypatch.setattr(broker, "_flush_in_order_ack", escaped_bug)
    broker.call_soon(lambda: broker.ack_in_order(None))  # type: ignore[arg-type]
    eventually(lambda: broker.io_loop_restarts == 1, 30, "the IO loop to be restarted")
    monkeypatch.undo()
    eventually(lambda: broker.connected, 30, "the session to reconnect")
    confirms = Confirms()
    _publish(broker, key, confirms, "after-restart")
    assert confirms.wait("after-restart") is None
