"""Batches on the wire: several tasks (or results) of one sender in one AMQP message.

A batch is a message kind of its own (``docs/asyncapi.yaml``, ``MessageBatch``): its
``content_type`` is :data:`BATCH_CONTENT_TYPE`, its ``gc-batch`` header counts its
entries, and its body is the entries one after the other, each the AMQP form of one task
or result (its properties and headers as a JSON head, then its body), length-prefixed::

    entry := u32 head length | head (UTF-8 JSON) | u32 body length | body

A header every entry carries with the same value travels once, among the batch's own
headers, and an entry's ``correlation_id`` equal to the batch's is left out: both come back
into each entry on the way in (the batch's headers under the entry's own), so every entry
decodes with the single-message decoders (:func:`~gc_core.protocol.decode_task`,
:func:`~gc_core.protocol.decode_result`) and every per-task check holds for it. Framing is
bounded (:data:`MAX_BATCH_TASKS`, :data:`MAX_ENTRY_HEAD`) and checked before anything is
decoded: a malformed batch is refused whole, a malformed entry costs that entry alone.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from gc_core.errors import ProtocolError
from gc_core.ids import random_id
from gc_core.protocol import (
    H_PROTOCOL,
    MAX_OUTPUT_HEADER,
    PROTOCOL_VERSION,
    STRICT_JSON,
    Envelope,
    ResultMessage,
    TaskMessage,
    decode_result,
    encode_result,
    encode_task,
)

__all__ = ["BATCH_CONTENT_TYPE", "H_BATCH", "MAX_BATCH_TASKS", "MAX_ENTRY_HEAD",
           "decode_results", "encode_result_batch", "encode_task_batch", "entry_count",
           "is_batch", "split_batch"]

#: The content type that marks a batch.
BATCH_CONTENT_TYPE = "application/vnd.gc-fabric.batch"
#: Header holding how many entries the batch carries.
H_BATCH = "gc-batch"
#: Most entries one batch may carry: a larger one is refused whole.
MAX_BATCH_TASKS = 1_000
#: Longest head of one entry, in bytes: its headers, captured output included (two
#: ``gc-stdout``/``gc-stderr`` headers at their bound, plus room for the rest).
MAX_ENTRY_HEAD = 2 * MAX_OUTPUT_HEADER + 64 * 1024
_LENGTH = struct.Struct(">I")
#: Writes entry heads (one encoder: ``json.dumps`` with an argument builds one per call).
_HEAD_JSON = json.JSONEncoder(separators=(",", ":"))
#: Properties and headers copied from a dead-lettered batch into each of its entries, so
#: each decodes as the dead letter it is.
_DEATH_HEADERS = ("x-death", "x-delivery-count", "x-first-death-reason", "x-first-death-queue")


def is_batch(envelope: Envelope) -> bool:
    """Whether ``envelope`` is a batch (else a single task or result)."""
    return envelope.content_type == BATCH_CONTENT_TYPE


def entry_count(envelope: Envelope) -> int | None:
    """How many entries a batch says it carries: its ``gc-batch`` header, None if that is
    missing, not an integer or out of bounds (1 to MAX_BATCH_TASKS)."""
    headers = envelope.headers if isinstance(envelope.headers, dict) else {}
    count = headers.get(H_BATCH)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_BATCH_TASKS:
        return None
    return count


def encode_task_batch(tasks: Sequence[TaskMessage]) -> Envelope:
    """Tasks of one user for one endpoint and task group, as one message (one task: the
    plain single-task message)."""
    if len(tasks) == 1:
        return encode_task(tasks[0])
    return _frame([encode_task(task) for task in tasks], tasks[0].task_group_id)


def encode_result_batch(results: Sequence[ResultMessage]) -> Envelope:
    """Results for one user's task group, as one message (one result: the plain message)."""
    if len(results) == 1:
        return encode_result(results[0])
    return _frame([encode_result(result) for result in results], results[0].task_group_id)


def split_batch(envelope: Envelope) -> list[Envelope]:
    """The entries of a batch, each as the single message it stands for: the batch's
    headers (but ``gc-batch``) under the entry's own, a dead-lettered batch's death headers
    over both. Nothing in them is checked yet.

    Raises:
        ProtocolError: the batch's count or framing is wrong or out of bounds.
    """
    headers = envelope.headers if isinstance(envelope.headers, dict) else {}
    count = entry_count(envelope)
    if count is None:
        raise ProtocolError(f"a batch's {H_BATCH} header must count 1 to {MAX_BATCH_TASKS:,} "
                            f"entries, not {str(headers.get(H_BATCH))[:40]!r}",
                            raw=envelope.body)
    shared = {name: value for name, value in headers.items() if name != H_BATCH}
    death = {name: headers[name] for name in _DEATH_HEADERS if name in headers}
    entries = [_entry(head, body, shared, death, envelope)
               for head, body in _frames(envelope.body, count)]
    if len(entries) != count:
        raise ProtocolError(f"the batch says it holds {count} entries but holds "
                            f"{len(entries)}", raw=envelope.body)
    return entries


def decode_results(envelope: Envelope) -> list[ResultMessage | ProtocolError]:
    """The results a message carries: one for a single result (or dead-lettered task),
    one per entry for a batch, each entry's failure in its place.

    Raises:
        ProtocolError: a single message, or a batch's framing, is malformed.
    """
    if not is_batch(envelope):
        return [decode_result(envelope)]
    decoded: list[ResultMessage | ProtocolError] = []
    for entry in split_batch(envelope):
        try:
            decoded.append(decode_result(entry))
        except ProtocolError as exc:
            decoded.append(exc)
    return decoded


def _frame(entries: list[Envelope], correlation_id: str) -> Envelope:
    """``entries`` as one batch; the headers they all share go once, as the batch's."""
    shared = set(entries[0].headers.items())
    for entry in entries[1:]:
        shared.intersection_update(entry.headers.items())
    common = dict(shared)
    parts: list[bytes] = []
    for entry in entries:
        head: dict[str, Any] = {"message_id": entry.message_id,
                                "content_type": entry.content_type,
                                "headers": {name: value for name, value in entry.headers.items()
                                            if name not in common}}
        if entry.correlation_id != correlation_id:
            head["correlation_id"] = entry.correlation_id
        encoded = _HEAD_JSON.encode(head).encode()
        parts += (_LENGTH.pack(len(encoded)), encoded, _LENGTH.pack(len(entry.body)), entry.body)
    headers = {H_PROTOCOL: PROTOCOL_VERSION, **common, H_BATCH: len(entries)}
    return Envelope(random_id(), correlation_id, BATCH_CONTENT_TYPE, headers,
                    b"".join(parts))


def _frames(body: bytes, count: int) -> Iterator[tuple[bytes, bytes]]:
    """(head, body) of each entry; refuses a length past the end or a head over its bound,
    and stops after ``count`` + 1 entries (the caller refuses the surplus)."""
    view, offset, seen = memoryview(body), 0, 0
    while offset < len(body) and seen <= count:
        head = _take(view, offset, MAX_ENTRY_HEAD, body)
        offset += _LENGTH.size + len(head)
        payload = _take(view, offset, len(body), body)
        offset += _LENGTH.size + len(payload)
        seen += 1
        yield head, payload


def _take(view: memoryview, offset: int, bound: int, raw: bytes) -> bytes:
    if offset + _LENGTH.size > len(view):
        raise ProtocolError("a batch entry is cut short", raw=raw)
    (length,) = _LENGTH.unpack_from(view, offset)
    start = offset + _LENGTH.size
    if length > bound or start + length > len(view):
        raise ProtocolError(f"a batch entry of {length:,} bytes runs past its bound or the "
                            "batch's end", raw=raw)
    return bytes(view[start:start + length])


def _entry(head: bytes, body: bytes, shared: dict[str, Any], death: dict[str, Any],
           batch: Envelope) -> Envelope:
    """One entry as the message it stands for: its own headers over the batch's ``shared``
    ones, under the batch's ``death`` headers; no ``correlation_id``: the batch's. A head
    that is not a flat JSON object of text properties and text-or-integer headers is
    refused (a deeply nested one stops the parser with a RecursionError, refused likewise)."""
    try:
        fields = STRICT_JSON.decode(head.decode())
        headers = fields["headers"]
        if not isinstance(headers, dict) or not all(
                type(value) is str or type(value) is int for value in headers.values()):
            raise TypeError("headers must map names to text or integers")
        message_id, content_type = fields["message_id"], fields["content_type"]
        correlation_id = fields.get("correlation_id", batch.correlation_id)
        if not all(isinstance(value, str) for value in (message_id, correlation_id, content_type)):
            raise TypeError("message_id, correlation_id and content_type must be text")
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise ProtocolError(f"a batch entry's head is malformed: {str(exc)[:200]}",
                            raw=batch.body) from exc
    return Envelope(message_id, correlation_id, content_type, {**shared, **headers, **death},
                    body)
