"""A message the broker can never take costs its sender an error, never the session.

Real broker (the session's vhost on the local node): each publish below was once able to
kill a BrokerSession's IO thread or make it reconnect and re-send for ever.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest

from gc_core.broker import BrokerSession, QueueCounts
from gc_core.broker_consumers import Delivery
from gc_core.broker_limits import Refusal
from gc_core.errors import BrokerRefused
from gc_core.protocol import Envelope
from gc_core.topology import load_topology
from tests.fabric import Fabric, eventually, rabbitmqctl

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

    def broken(_counts: QueueCounts) -> None:
        raise RuntimeError("a bug in a callback")

    broker.queue_counts(TOPOLOGY.queue("ledger").name, broken)
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

    monkeypatch.setattr(broker, "_io_flush_in_order_ack", escaped_bug)
    broker.call_soon(lambda: broker.ack_in_order(None))  # type: ignore[arg-type]
    eventually(lambda: broker.io_loop_restarts == 1, 30, "the IO loop to be restarted")
    monkeypatch.undo()
    eventually(lambda: broker.connected, 30, "the session to reconnect")
    confirms = Confirms()
    _publish(broker, key, confirms, "after-restart")
    assert confirms.wait("after-restart") is None


def test_a_publish_refused_access_fails_with_every_publish_to_its_target_and_no_other(
        fabric: Fabric) -> None:
    # Given a broker user who may write to result queues (through the default exchange)
    # but not to the gc.results exchange
    user = f"writer-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_user", user, "pw")
    rabbitmqctl("set_permissions", "-p", fabric.vhost, user, ".*",
                r"^(gc\.results\..*|amq\.default)$", ".*")
    group = f"g-{uuid.uuid4().hex[:8]}"
    queue = TOPOLOGY.queue("results", user="alice", task_group_id=group)
    broker = BrokerSession(f"amqp://{user}:pw@127.0.0.1:5672/{fabric.vhost}", name="attack-test",
                           topology=TOPOLOGY, queues=[queue])
    broker.start()
    try:
        # When it publishes twice to the exchange, then once to the queue directly
        key, confirms = TOPOLOGY.routing_key("result", user="alice", task_group_id=group), Confirms()
        _publish(broker, key, confirms, "refused-1")
        _publish(broker, key, confirms, "refused-2")
        broker.publish("", queue.name, Envelope("direct", "g", "application/json", {}, b"{}"),
                       on_confirm=confirms.callback("direct"))
        # Then the broker's ACCESS_REFUSED fails both publishes to the exchange for good, and
        # the one it permits is sent again after the reconnect and confirmed
        for message_id in ("refused-1", "refused-2"):
            reason = confirms.wait(message_id)
            assert isinstance(reason, Refusal) and "ACCESS_REFUSED" in reason, reason
        assert confirms.wait("direct") is None
        assert broker.gave_up is None and broker.io_loop_restarts == 0
    finally:
        broker.close()
        rabbitmqctl("delete_user", user)


def test_a_declaration_the_broker_refuses_stops_the_session_and_says_why(fabric: Fabric) -> None:
    # Given a queue that exists with other arguments than the session declares
    queue = TOPOLOGY.queue("results", user="alice", task_group_id=f"g-{uuid.uuid4().hex[:8]}")
    first = BrokerSession(fabric.broker_url, name="first", topology=TOPOLOGY, queues=[queue])
    first.start()
    first.close()
    other = replace(queue, arguments={**queue.arguments, "x-max-length": 7})
    broker = BrokerSession(fabric.broker_url, name="mismatch", topology=TOPOLOGY, queues=[other])
    try:
        # When the session starts, it is refused for good, in one sentence naming the session
        with pytest.raises(BrokerRefused) as refused:
            broker.start(timeout=10)
        message = str(refused.value)
        assert "refused session mismatch" in message and "PRECONDITION_FAILED" in message
        assert broker.gave_up is refused.value
    finally:
        broker.close()
        first.delete_queue(queue.name)


def test_an_answer_that_comes_after_its_caller_gave_up_is_not_taken_for_a_later_one(
        session: tuple[BrokerSession, str], fabric: Fabric) -> None:
    # Given a queue holding 3 messages and another holding none
    broker, key = session
    full, confirms = TOPOLOGY.queue("results", user="alice", task_group_id=key.split(".")[-1]), Confirms()
    for n in range(3):
        _publish(broker, key, confirms, f"m{n}")
        assert confirms.wait(f"m{n}") is None
    empty = f"empty-{uuid.uuid4().hex[:8]}"
    helper = BrokerSession(fabric.broker_url, name="helper", topology=TOPOLOGY,
                           queues=[replace(full, name=empty, bindings=())])
    helper.start()
    helper.close()
    # When the IO thread is busy (a slow callback) while a caller asks about the full
    # queue and gives up, then asks about the empty one
    broker.call_soon(lambda: time.sleep(1.5))
    assert broker.counts(full.name, timeout=0.3) is None
    # Then the late answer about the full queue comes first, and is not taken for this one
    assert broker.counts(empty, timeout=10) == QueueCounts(messages=0, consumers=0)
    assert broker.counts(full.name, timeout=10) == QueueCounts(messages=3, consumers=0)
    broker.delete_queue(empty)
    assert broker.wait_settled(10)


def test_ack_in_order_refuses_a_call_from_outside_the_io_thread(
        session: tuple[BrokerSession, str]) -> None:
    broker, _ = session
    delivery = Delivery(Envelope("m", "g", "application/json", {}, b"{}"), "", "", False, 0, 1, 1)

    with pytest.raises(RuntimeError, match="only its IO thread"):
        broker.ack_in_order(delivery)


def test_publishes_from_many_threads_at_once_are_all_confirmed(
        session: tuple[BrokerSession, str]) -> None:
    # Callers hand publishes to the IO thread while it flushes: none may be left waiting
    # in the outbox without a wake-up.
    broker, key = session
    confirms = Confirms()

    def publish_many(thread: int) -> None:
        for n in range(1500):
            _publish(broker, key, confirms, f"{thread}-{n}")
            if n % 100 == 0:
                time.sleep(0.001)  # let the IO thread drain the outbox now and then

    threads = [threading.Thread(target=publish_many, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    eventually(lambda: len(confirms.answers) == 6000, 60, "every publish to be confirmed")
    assert set(confirms.answers.values()) == {None}
