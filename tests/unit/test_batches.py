"""The batch message kind and the coalescer that fills it: pure, no broker."""

from __future__ import annotations

import json
import struct
import time

import pytest

from gc_core.batches import (
    MAX_BATCH_TASKS,
    decode_results,
    encode_result_batch,
    encode_task_batch,
    is_batch,
    split_batch,
)
from gc_core.broker_limits import Refusal
from gc_core.broker_publisher import ConfirmCallback
from gc_core.coalesce import Coalescer
from gc_core.errors import ProtocolError
from gc_core.protocol import (
    Envelope,
    ResultMessage,
    TaskMessage,
    decode_task,
    encode_result,
    encode_task,
)
from gc_core.serialize import JSON


def _task(n: int, **changes: object) -> TaskMessage:
    return TaskMessage(task_id=f"t-{n}", task_group_id="g", endpoint_id="e", function_id="f",
                       user="u", content_type=JSON.content_type, payload=JSON.dumps([n]),
                       resource_spec={"num_nodes": 1, "note": "{[not nested]}"}).model_copy(
        update=changes)


def _result(n: int) -> ResultMessage:
    return ResultMessage(task_id=f"t-{n}", task_group_id="g", endpoint_id="e", user="u",
                         state="success", content_type=JSON.content_type,
                         payload=JSON.dumps(n), stdout=f"out {n}\n")


def test_a_task_batch_splits_into_the_very_tasks_that_went_in() -> None:
    tasks = [_task(n) for n in range(5)]
    batch = encode_task_batch(tasks)
    assert is_batch(batch)
    assert [decode_task(entry) for entry in split_batch(batch)] == tasks


def test_one_task_or_result_travels_as_the_plain_single_message() -> None:
    assert encode_task_batch([_task(1)]) == encode_task(_task(1))
    assert encode_result_batch([_result(1)]) == encode_result(_result(1))


def test_a_result_batch_decodes_to_each_result_and_a_bad_entry_costs_itself_alone() -> None:
    results = [_result(n) for n in range(3)]
    batch = encode_result_batch(results)
    assert decode_results(batch) == results
    entries = split_batch(batch)
    broken = Envelope(entries[1].message_id, "g", JSON.content_type,
                      {**entries[1].headers, "gc-state": "exploded"}, b"")
    decoded = decode_results(_reframe([entries[0], broken, entries[2]], batch))
    assert decoded[0] == results[0] and decoded[2] == results[2]
    assert isinstance(decoded[1], ProtocolError)


def test_a_dead_lettered_batch_becomes_a_dead_letter_for_each_of_its_tasks() -> None:
    batch = encode_task_batch([_task(1), _task(2)])
    dead = Envelope(batch.message_id, batch.correlation_id, batch.content_type,
                    {**batch.headers, "x-death": [{"reason": "rejected", "queue": "q"}]},
                    batch.body)
    decoded = decode_results(dead)
    assert [(r.task_id, r.error.type) for r in decoded if isinstance(r, ResultMessage)
            and r.error is not None] == [("t-1", "TaskDeadLettered"), ("t-2", "TaskDeadLettered")]


def test_what_every_entry_shares_travels_once_as_the_batch_s_headers() -> None:
    tasks = [_task(n, task_group_id="g") for n in range(3)]
    batch = encode_task_batch(tasks)
    heads = [json.loads(head) for head, _body in _heads_and_bodies(batch)]
    assert {"gc-user": "u", "gc-endpoint-id": "e", "gc-function-id": "f", "gc-task-group": "g",
            "gc-protocol": 1}.items() <= batch.headers.items()
    assert all(head["headers"] == {} and "correlation_id" not in head for head in heads)
    assert [head["message_id"] for head in heads] == ["t-0", "t-1", "t-2"]
    # what differs stays with its entry, and every entry comes back whole
    mixed = [_task(0), _task(1, function_id="other")]
    entries = split_batch(encode_task_batch(mixed))
    assert [decode_task(entry) for entry in entries] == mixed
    assert "gc-batch" not in entries[0].headers


def test_an_entry_s_own_header_wins_over_the_batch_s_and_its_sender_is_checked_on_it() -> None:
    batch = encode_task_batch([_task(1), _task(2)])
    entries = split_batch(batch)
    forged = Envelope("t-2", "g", JSON.content_type, {"gc-user": "mallory"}, entries[1].body)
    taken = [decode_task(entry) for entry in split_batch(_reframe([entries[0], forged], batch))]
    assert [task.user for task in taken] == ["u", "mallory"]  # the agent's sender check sees it


def test_a_batch_header_no_entry_could_carry_costs_its_entries_their_decoding() -> None:
    batch = encode_task_batch([_task(1), _task(2)])
    odd = Envelope(batch.message_id, batch.correlation_id, batch.content_type,
                   {**batch.headers, "gc-function-id": 3.5}, batch.body)
    for entry in split_batch(odd):
        with pytest.raises(ProtocolError, match="malformed task message"):
            decode_task(entry)


def test_an_entry_with_a_correlation_id_of_its_own_keeps_it() -> None:
    batch = encode_task_batch([_task(1), _task(2)])
    entries = split_batch(batch)
    own = Envelope("t-2", "other-group", JSON.content_type, {}, entries[1].body)
    framed = _reframe([entries[0], own], batch)
    assert [entry.correlation_id for entry in split_batch(framed)] == ["g", "other-group"]


def test_a_batch_with_every_header_in_its_entries_decodes_as_before() -> None:
    # the form earlier releases sent: whole heads, only user, endpoint and group shared
    tasks = [_task(n) for n in range(3)]
    whole = _reframe([encode_task(task) for task in tasks], Envelope(
        "b", "g", "application/vnd.gc-fabric.batch",
        {"gc-protocol": 1, "gc-user": "u", "gc-endpoint-id": "e", "gc-task-group": "g"}, b""))
    assert [decode_task(entry) for entry in split_batch(whole)] == tasks


@pytest.mark.parametrize(("count", "body", "problem"), [
    (MAX_BATCH_TASKS + 1, b"", "must count 1 to"),
    (True, b"", "must count 1 to"),
    (2, None, "holds 3"),
    (1, struct.pack(">I", 10), "past its bound"),
    (1, b"\0\0", "cut short"),
    (1, struct.pack(">I", 2**20) + b" " * 2**20 + b"\0\0\0\0", "past its bound"),
    (1, struct.pack(">I", 20_000) + b"[" * 20_000 + b"\0\0\0\0", "malformed"),
    (1, struct.pack(">I", 2) + b"[]" + b"\0\0\0\0", "malformed"),
    (1, struct.pack(">I", 2) + b"\xff\xfe" + b"\0\0\0\0", "malformed"),  # no UTF-8
])
def test_a_batch_outside_its_bounds_is_refused_whole(count: object, body: bytes | None,
                                                     problem: str) -> None:
    three = encode_task_batch([_task(n) for n in range(3)])
    envelope = Envelope("b", "g", three.content_type, {**three.headers, "gc-batch": count},
                        three.body if body is None else body)
    with pytest.raises(ProtocolError, match=problem):
        split_batch(envelope)


class _Broker:
    """What the coalescer publishes, and the confirms the test gives back."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[str], ConfirmCallback]] = []

    def publish(self, _key: str, _items: object, envelope: Envelope,
                on_confirm: ConfirmCallback) -> None:
        entries = split_batch(envelope) if is_batch(envelope) else [envelope]
        self.sent.append(([entry.message_id for entry in entries], on_confirm))


def test_the_first_task_goes_at_once_and_those_behind_its_confirm_go_together() -> None:
    broker = _Broker()
    answers: dict[str, str | None] = {}
    coalescer: Coalescer[TaskMessage] = Coalescer(broker.publish, encode_task_batch,
                                                  lambda task: len(task.payload))

    def add(n: int) -> None:
        coalescer.add("e", _task(n), lambda reason: answers.__setitem__(f"t-{n}", reason))

    add(0)
    assert [ids for ids, _ in broker.sent] == [["t-0"]]
    for n in range(1, 4):
        add(n)
    assert len(broker.sent) == 1 and not coalescer.idle()
    broker.sent[0][1](None)
    assert [ids for ids, _ in broker.sent] == [["t-0"], ["t-1", "t-2", "t-3"]]
    assert answers == {"t-0": None}
    # a batch refused for good is sent again one task per message
    broker.sent[1][1](Refusal("too large"))
    assert [ids for ids, _ in broker.sent[2:]] == [["t-1"], ["t-2"], ["t-3"]]
    assert coalescer.idle()
    for _, confirm in broker.sent[2:]:
        confirm(None)
    assert answers == dict.fromkeys(("t-0", "t-1", "t-2", "t-3"))


def _holding(linger: float) -> tuple[_Broker, Coalescer[TaskMessage]]:
    broker = _Broker()
    return broker, Coalescer(broker.publish, encode_task_batch, lambda task: len(task.payload),
                             linger=linger)


def _sent_eventually(broker: _Broker, count: int) -> list[list[str]]:
    """The ids of each message sent, once ``count`` were (a liveness bound, not a timing)."""
    deadline = time.monotonic() + 10
    while len(broker.sent) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    return [ids for ids, _ in broker.sent]


def test_items_with_more_coming_are_held_until_the_last_of_them_comes() -> None:
    broker, coalescer = _holding(linger=3600)
    for n in range(3):
        coalescer.add("g", _task(n), lambda _reason: None, more_coming=True)
    assert broker.sent == [] and not coalescer.idle()

    coalescer.add("g", _task(3), lambda _reason: None)

    assert [ids for ids, _ in broker.sent] == [["t-0", "t-1", "t-2", "t-3"]]


def test_what_is_held_goes_when_its_linger_is_up_though_no_last_item_comes() -> None:
    broker, coalescer = _holding(linger=0.05)
    for n in range(3):
        coalescer.add("g", _task(n), lambda _reason: None, more_coming=True)

    assert _sent_eventually(broker, 1) == [["t-0", "t-1", "t-2"]]
    broker.sent[0][1](None)
    assert coalescer.idle()


def test_what_is_held_behind_an_unconfirmed_publish_goes_after_both() -> None:
    broker, coalescer = _holding(linger=0.05)
    coalescer.add("g", _task(0), lambda _reason: None)
    coalescer.add("g", _task(1), lambda _reason: None, more_coming=True)
    coalescer.add("g", _task(2), lambda _reason: None, more_coming=True)
    time.sleep(0.1)  # the linger is up while t-0 is unconfirmed: its confirm sends them
    assert [ids for ids, _ in broker.sent] == [["t-0"]]

    broker.sent[0][1](None)

    assert _sent_eventually(broker, 2) == [["t-0"], ["t-1", "t-2"]]


def test_a_held_batch_whose_publish_fails_is_answered_and_the_flusher_goes_on() -> None:
    broker = _Broker()
    failures = iter([RuntimeError("the session is gone")])

    def publish(key: str, items: object, envelope: Envelope, on_confirm: ConfirmCallback) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        broker.publish(key, items, envelope, on_confirm)

    coalescer: Coalescer[TaskMessage] = Coalescer(publish, encode_task_batch,
                                                  lambda task: len(task.payload), linger=0.05)
    answers: dict[str, str | None] = {}
    for n in range(2):
        coalescer.add("g", _task(n), lambda reason, n=n: answers.__setitem__(f"t-{n}", reason),
                      more_coming=True)
    deadline = time.monotonic() + 10
    while len(answers) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    # The failed publish answers each of its items (the agent requeues their tasks) ...
    assert answers == dict.fromkeys(("t-0", "t-1"), "it could not be published: the session is gone")
    # ... and what is held next still goes
    coalescer.add("g", _task(2), lambda _reason: None, more_coming=True)
    assert _sent_eventually(broker, 1) == [["t-2"]]


def test_held_items_go_at_once_when_a_batch_is_full() -> None:
    broker = _Broker()
    coalescer: Coalescer[TaskMessage] = Coalescer(
        broker.publish, encode_task_batch, lambda task: len(task.payload), max_items=2,
        linger=3600)
    for n in range(4):
        coalescer.add("g", _task(n), lambda _reason: None, more_coming=True)

    assert [ids for ids, _ in broker.sent] == [["t-0", "t-1"], ["t-2", "t-3"]]


def _reframe(entries: list[Envelope], like: Envelope) -> Envelope:
    """A batch of ``entries`` framed as the contract says, with ``like``'s properties."""
    parts = []
    for entry in entries:
        head = (b'{"message_id":"%s","correlation_id":"%s","content_type":"%s","headers":%s}'
                % (entry.message_id.encode(), entry.correlation_id.encode(),
                   entry.content_type.encode(), json.dumps(entry.headers).encode()))
        parts += [struct.pack(">I", len(head)), head, struct.pack(">I", len(entry.body)),
                  entry.body]
    return Envelope(like.message_id, like.correlation_id, like.content_type,
                    {**like.headers, "gc-batch": len(entries)}, b"".join(parts))


def _heads_and_bodies(batch: Envelope) -> list[tuple[bytes, bytes]]:
    """The raw heads and bodies of a batch's entries, as the contract frames them."""
    found, offset = [], 0
    while offset < len(batch.body):
        parts = []
        for _ in range(2):
            (length,) = struct.unpack_from(">I", batch.body, offset)
            parts.append(batch.body[offset + 4:offset + 4 + length])
            offset += 4 + length
        found.append((parts[0], parts[1]))
    return found
