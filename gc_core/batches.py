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
from collections.abc import Callable, Sequence
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
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

#: Properties and headers copied from a dead-lettered batch into each of its entries, so
#: each decodes as the dead letter it is.
_DEATH_HEADERS = ("x-death", "x-delivery-count", "x-first-death-reason", "x-first-death-queue")
#: The types an entry's header values and properties may have (exactly: a bool is no int).
_HEADER_TYPES = frozenset((str, int))
_TEXT = frozenset((str,))


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
    entries = _entries(envelope, count, shared, death)
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


def _head_encoder() -> Callable[[dict[str, Any]], str]:
    """What writes an entry's head as compact JSON. ``JSONEncoder.encode`` builds a C
    encoder on every call, a third of the cost of encoding a small head: this one is built
    once (the pure-Python encoder where the C one is missing)."""
    if c_make_encoder is None:  # pragma: no cover - CPython has the C encoder
        return json.JSONEncoder(separators=(",", ":")).encode
    encoder = c_make_encoder(None, _not_json, encode_basestring_ascii, None, ":", ",", False,
                             False, True)
    return lambda head: "".join(encoder(head, 0))


def _not_json(value: Any) -> Any:
    raise TypeError(f"a batch entry's head holds a {type(value).__name__}, not JSON")


_encode_head = _head_encoder()


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
        encoded = _encode_head(head).encode()
        parts += (_LENGTH.pack(len(encoded)), encoded, _LENGTH.pack(len(entry.body)), entry.body)
    headers = {H_PROTOCOL: PROTOCOL_VERSION, **common, H_BATCH: len(entries)}
    return Envelope(random_id(), correlation_id, BATCH_CONTENT_TYPE, headers,
                    b"".join(parts))


def _entries(batch: Envelope, count: int, shared: dict[str, Any],
             death: dict[str, Any]) -> list[Envelope]:
    """Each entry of ``batch`` as the message it stands for; refuses a length past the end
    or a head over its bound, and stops after ``count`` + 1 entries (the caller refuses the
    surplus). One loop over the body: a batch holds up to MAX_BATCH_TASKS entries, and every
    result passes here in the client and the ledger, every task in the agent."""
    body, offset, end = batch.body, 0, len(batch.body)
    size, unpack = _LENGTH.size, _LENGTH.unpack_from
    entries: list[Envelope] = []
    while offset < end and len(entries) <= count:
        parts: list[bytes] = []
        for bound in (MAX_ENTRY_HEAD, end):
            if offset + size > end:
                raise ProtocolError("a batch entry is cut short", raw=body)
            (length,) = unpack(body, offset)
            offset += size
            if length > bound or offset + length > end:
                raise ProtocolError(f"a batch entry of {length:,} bytes runs past its bound or "
                                    "the batch's end", raw=body)
            parts.append(body[offset:offset + length])
            offset += length
        entries.append(_entry(parts[0], parts[1], shared, death, batch))
    return entries


def _entry(head: bytes, body: bytes, shared: dict[str, Any], death: dict[str, Any],
           batch: Envelope) -> Envelope:
    """One entry as the message it stands for: its own headers over the batch's ``shared``
    ones, under the batch's ``death`` headers; no ``correlation_id``: the batch's. A head
    that is not a flat JSON object of text properties and text-or-integer headers is
    refused (a deeply nested one stops the parser with a RecursionError, refused likewise)."""
    try:
        fields = STRICT_JSON.decode(head.decode())
        headers = fields["headers"]
        if type(headers) is not dict or not _HEADER_TYPES.issuperset(map(type, headers.values())):
            raise TypeError("headers must map names to text or integers")
        message_id, content_type = fields["message_id"], fields["content_type"]
        correlation_id = fields.get("correlation_id", batch.correlation_id)
        if not _TEXT.issuperset((type(message_id), type(correlation_id), type(content_type))):
            raise TypeError("message_id, correlation_id and content_type must be text")
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise ProtocolError(f"a batch entry's head is malformed: {str(exc)[:200]}",
                            raw=batch.body) from exc
    return Envelope(message_id, correlation_id, content_type, {**shared, **headers, **death},
                    body)
