"""Hypothesis strategies for hostile AMQP messages aimed at a gc-fabric.

A message goes to one target: a live agent's task or command queue, ``gc.results``,
``gc.events``, ``gc.ledger`` directly, or ``gc.dead``. It starts as a plausible one of its
kind (so it gets past the first check) and then suffers mutations: the fabric's own header
names filled with wrong types, nesting up to :data:`MAX_DEPTH`, NUL and control characters,
over-long ids, a value sized up to the frame limit, every content type the fabric knows and
some it does not, and bodies of garbage, JSON that looks right, or pickles that create a
marker file if anyone ever loads them.

Hypothesis draws the values (:func:`materials`: a few of every kind per message); a
``random.Random`` seeded by the run's seed and the message's number composes them
(:func:`compose`). Hypothesis favours the simplest values and repeats whole draws, so left
to choose weights and sizes it would make most messages alike and few large.

Header tables are encoded here rather than by pika, which knows only some AMQP field types
(no floats, no 8- or 16-bit integers, no raw timestamps): a consumer must survive every
type another client may send.
"""

from __future__ import annotations

import calendar
import functools
import json
import math
import pickle
import random
import struct
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pika
from hypothesis import strategies as st

from gc_core import protocol
from gc_core.serialize import PYTHON_VERSION, SERIALIZERS
from gc_core.topology import Topology

__all__ = [
    "FRAME_MAX",
    "TARGETS",
    "Aim",
    "Field",
    "Material",
    "Unencodable",
    "WireMessage",
    "WireProperties",
    "compose",
    "describe",
    "encode_table",
    "materials",
]

#: The broker's default frame_max: a message's properties must fit one frame.
FRAME_MAX = 131072
#: Longest AMQP short string: table keys, message and correlation ids, routing keys.
SHORTSTR_MAX = 255
#: Deepest nesting of header tables and arrays.
MAX_DEPTH = 30
#: Deepest JSON text put into a header or a body (far past Python's recursion limit).
MAX_JSON_DEPTH = 60_000
#: Largest body drawn: two full frames and a bit, so bodies span several frames.
MAX_BODY = 2 * FRAME_MAX + 7
#: Sizes where bounds and buffers tend to break: ids, short strings, 16-bit and frame limits.
BOUNDARY_SIZES = (0, 1, 63, 64, 65, 127, 128, 255, 256, 300, 1023, 1024, 4096, 65535, 65536,
                  FRAME_MAX - 4096, FRAME_MAX - 512, FRAME_MAX - 64, FRAME_MAX, FRAME_MAX + 1)
#: Every header the fabric reads or writes (gc_core.protocol's H_* names) and the broker's.
HEADER_NAMES = tuple(sorted({value for name, value in vars(protocol).items()
                             if name.startswith("H_") and isinstance(value, str)}
                            | {"x-death", "x-delivery-count", "x-first-death-reason",
                               "x-first-death-queue", "x-first-death-exchange", "CC", "BCC"}))
#: Content types: the fabric's own, near misses and strangers.
CONTENT_TYPES = (*SERIALIZERS, "application/json; charset=utf-8", "APPLICATION/JSON",
                 "application/x-python-serialize", "application/vnd.gc.cloudpickle+zlib",
                 "text/plain", "application/octet-stream", "", "\x00", "a" * SHORTSTR_MAX)
#: Texts that have broken parsers, loggers and routing keys before.
NASTY_TEXTS = ("", " ", "\x00", "a\x00b", "\n", "a\nb", "\r\n", "\x1b[31m", "\u202e", "\ufeff",
               "\U0001f525", "..", "../../etc/passwd", "#", "*", "a.b", "a.#", "%s%s%n", "{}",
               "[]", "null", "true", "1", "-1", "NaN", "Infinity", "1e999999", "None",
               "endpoint-", "guest", "anonymous", "root", "x" * 64, "x" * 65, "é" * 128)
#: AMQP field type bytes with a fixed-size payload, and the struct format of it.
FIXED_FIELDS = {b"b": ">b", b"B": ">B", b"U": ">h", b"u": ">H", b"s": ">h", b"I": ">i",
                b"i": ">I", b"L": ">q", b"l": ">q", b"f": ">f", b"d": ">d", b"T": ">Q"}
#: Every field type byte AMQP 0-9-1 (with RabbitMQ's errata) defines.
KNOWN_FIELD_TYPES = frozenset(FIXED_FIELDS) | {b"t", b"D", b"S", b"x", b"A", b"F", b"V"}


class Unencodable(ValueError):
    """A drawn value no AMQP encoding can carry (an int past 64 bits, a lone surrogate)."""


@dataclass(frozen=True)
class Field:
    """A header value with an explicit AMQP field type byte and its raw encoded payload."""

    kind: bytes
    payload: bytes


def encode_table(table: Mapping[str, Any]) -> bytes:
    """An AMQP field table, every field type allowed (:class:`Field` for explicit ones).

    Raises:
        Unencodable: a key or value has no AMQP encoding.
    """
    body = b"".join(_shortstr(key) + encode_value(value) for key, value in table.items())
    return struct.pack(">I", len(body)) + body


def encode_value(value: Any) -> bytes:
    """One AMQP field value: its type byte, then its payload."""
    try:
        return _encode_value(value)
    except (struct.error, UnicodeEncodeError, OverflowError) as exc:
        raise Unencodable(f"{type(value).__name__} value cannot be encoded: {exc}") from exc


def _encode_value(value: Any) -> bytes:
    if isinstance(value, Field):
        return value.kind + value.payload
    if isinstance(value, bool):
        return b"t" + bytes([value])
    if isinstance(value, int):
        return (b"I" + struct.pack(">i", value) if -2**31 <= value < 2**31
                else b"l" + struct.pack(">q", value))
    if isinstance(value, float):
        return b"d" + struct.pack(">d", value)
    if isinstance(value, str):
        return _long(b"S", value.encode())
    if isinstance(value, bytes):
        return _long(b"x", value)
    if isinstance(value, datetime):
        return b"T" + struct.pack(">Q", calendar.timegm(value.utctimetuple()))
    if isinstance(value, dict):
        return b"F" + encode_table(value)
    if isinstance(value, list):
        return _long(b"A", b"".join(encode_value(item) for item in value))
    if value is None:
        return b"V"
    raise Unencodable(f"no AMQP field type for {type(value).__name__}")


def _long(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack(">I", len(data)) + data


def _shortstr(text: str) -> bytes:
    data = text.encode()
    if len(data) > SHORTSTR_MAX:
        raise Unencodable(f"a table key of {len(data)} bytes is over {SHORTSTR_MAX}")
    return bytes([len(data)]) + data


class WireProperties(pika.BasicProperties):  # type: ignore[misc]
    """Message properties whose headers :func:`encode_table` encodes (every field type)."""

    def encode(self) -> list[bytes]:
        headers: dict[str, Any] | None = vars(self)["headers"]  # pika's own type is unknown
        self.headers = None
        try:
            pieces: list[bytes] = super().encode()
        finally:
            self.headers = headers
        if headers is None:
            return pieces
        # The headers table comes third, after content type and encoding (AMQP 0-9-1 4.2.6).
        encoded = b"".join(pieces)
        flags = struct.unpack(">H", encoded[:2])[0] | pika.BasicProperties.FLAG_HEADERS
        start = 2 + sum(len(_shortstr(text)) for text in (self.content_type, self.content_encoding)
                        if text is not None)
        return [struct.pack(">H", flags), encoded[2:start], encode_table(headers), encoded[start:]]


@dataclass(frozen=True)
class WireMessage:
    """One message to publish: where it goes, its properties and its body."""

    target: str
    exchange: str
    routing_key: str
    properties: WireProperties
    body: bytes


@dataclass(frozen=True)
class Aim:
    """What the messages aim at, and the names a plausible message carries."""

    topology: Topology
    endpoint_id: str
    #: A registered function: tasks calling it are only ever sent as JSON, never a pickle,
    #: since running the submitter's pickle is what an endpoint that allows it is for.
    function_id: str
    user: str
    #: The file a loaded marker pickle creates: it must never appear.
    marker: str


class _Marker:
    """Unpickling this opens (creates) the marker file: proof that someone loaded it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (self.path, "a")


# -- what hypothesis draws ---------------------------------------------------------------------

@dataclass(frozen=True)
class Material:
    """The values hypothesis drew for one message: a few of every kind."""

    ids: tuple[str, ...]
    shortstrs: tuple[str, ...]
    #: One value of each hostile kind (:func:`_hostile_kinds`).
    hostile: tuple[Any, ...]
    json_values: tuple[Any, ...]
    #: Wrong values for a model's fields.
    wrong_json: tuple[Any, ...]
    id_lists: tuple[list[str], ...]


def _ids(aim: Aim) -> st.SearchStrategy[str]:
    """Id-shaped texts: valid, just over a bound, or with characters ids must not carry."""
    valid = st.text(st.sampled_from("abcdef0123456789-_AZ"), min_size=1, max_size=64)
    return st.one_of(st.uuids().map(str), valid, st.sampled_from(NASTY_TEXTS),
                     st.sampled_from([aim.endpoint_id, aim.user, f"endpoint-{aim.endpoint_id}"]),
                     st.text(max_size=20).map(lambda t: f"id-{t}"), st.text(min_size=60, max_size=70))


def _scalar_kinds() -> tuple[st.SearchStrategy[Any], ...]:
    """Small header values, one strategy per AMQP field type and some hostile texts."""
    return (
        st.none(), st.booleans(), st.integers(), st.floats(),
        st.sampled_from(NASTY_TEXTS), st.text(max_size=30), st.binary(max_size=30),
        st.datetimes(min_value=datetime(1970, 1, 2), timezones=st.just(timezone.utc)),
        st.builds(_fixed_field, st.sampled_from(sorted(FIXED_FIELDS)),
                  st.binary(min_size=8, max_size=8)),
        st.builds(lambda places, raw: Field(b"D", struct.pack(">Bi", places, raw)),
                  st.integers(0, 255), st.integers(-2**31, 2**31 - 1)))


def _hostile_kinds() -> tuple[st.SearchStrategy[Any], ...]:
    """Hostile header values: each scalar kind, containers of them, nesting to MAX_DEPTH."""
    scalars = st.one_of(_scalar_kinds())
    return (*_scalar_kinds(),
            st.lists(scalars, max_size=8),
            st.dictionaries(st.text(max_size=12), scalars, max_size=8),
            st.builds(_nest, scalars, st.lists(st.booleans(), min_size=1, max_size=MAX_DEPTH)))


def _fixed_field(kind: bytes, raw: bytes) -> Field:
    """A fixed-size field with any payload: NaN doubles, timestamps past the year 9999."""
    return Field(kind, raw[:struct.calcsize(FIXED_FIELDS[kind])])


def _nest(leaf: Any, shape: list[bool]) -> Any:
    for as_table in shape:
        leaf = {"a": leaf} if as_table else [leaf]
    return leaf


#: JSON values for bodies: plain data, with the texts that break things.
_JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=20), st.sampled_from(NASTY_TEXTS)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)


@functools.cache
def materials(aim: Aim) -> st.SearchStrategy[Material]:
    """Values for one message (built once per Aim: building a strategy costs more than a
    publish)."""
    ids = _ids(aim)
    return st.builds(
        Material,
        ids=st.tuples(*[ids] * 4),
        shortstrs=st.tuples(*[st.one_of(ids, st.text(max_size=40))] * 2),
        hostile=st.tuples(*_hostile_kinds()),
        json_values=st.tuples(_JSON_VALUES, _JSON_VALUES),
        wrong_json=st.tuples(_JSON_VALUES, st.sampled_from([1e308, -1, 2**70, 10**4000, "", [], {}])),
        id_lists=st.tuples(st.lists(ids, max_size=20)))


# -- what the seeded Random makes of it ---------------------------------------------------------

#: What sized texts are made of: NUL, control, bidi, multi-byte, JSON and routing-key syntax.
_TEXT_UNITS = ("a", "é", "\x00", "\n", "\x7f", "{", "[", "\U0001f525", "\u202e", "%s", "ab.cd#")
#: JSON openers for deep texts, and what closes each.
_DEEP_JSON = {"[": "]", '{"a":': "}", '{"args":[': "]}"}
#: Bodies that have broken JSON decoders.
_NASTY_BODIES = (b"", b"NaN", b"1e999999", b"9" * 5000, b"\xff\xfe", b'"\\ud800"', b"[" * 5000,
                 b'{"args": 1}', b'{"args": [], "kwargs": []}', b'{"a":1,"a":2}',
                 b'{"args": [], "kwargs": {}, "extra": 1}')


@dataclass(frozen=True)
class _Pick:
    """Composes one message: the seeded Random's choices over hypothesis's values."""

    rnd: random.Random
    aim: Aim
    material: Material

    def chance(self, odds: float) -> bool:
        return self.rnd.random() < odds

    def id(self) -> str:
        return self.rnd.choice(self.material.ids)

    def shortstr(self) -> str:
        """Mostly fits an AMQP short string (the rest are skipped as unencodable)."""
        return self.sized_text(SHORTSTR_MAX + 1) if self.chance(0.2) else self.rnd.choice(
            self.material.shortstrs)

    def size(self, limit: int) -> int:
        """A size up to ``limit``: a boundary size a third of the time, else log-uniform."""
        if self.chance(1 / 3):
            return self.rnd.choice([s for s in BOUNDARY_SIZES if s <= limit])
        return int(math.exp(self.rnd.uniform(0, math.log(limit + 1)))) - 1

    def sized_text(self, limit: int) -> str:
        unit, size = self.rnd.choice(_TEXT_UNITS), self.size(limit)
        return (unit * (size // len(unit) + 1))[:size]

    def deep_json(self, depth_limit: int) -> str:
        """JSON nested up to ``depth_limit`` deep: bait for a decoder without a bound."""
        opener = self.rnd.choice(sorted(_DEEP_JSON))
        depth = self.size(depth_limit)
        return opener * depth + "1" + _DEEP_JSON[opener] * depth

    def marker_pickle(self) -> bytes:
        """A pickle (any protocol, bare or as a call's ``(args, kwargs)``) creating the marker."""
        marker = _Marker(self.aim.marker)
        shape = self.rnd.choice([marker, ((marker,), {}), [marker], {"args": [marker], "kwargs": {}}])
        return pickle.dumps(shape, self.rnd.randint(0, pickle.HIGHEST_PROTOCOL))

    def hostile(self) -> Any:
        """A hostile header value, every kind equally likely."""
        made = (lambda: self.sized_text(4096), self.marker_pickle, lambda: self.deep_json(2000))
        pick = self.rnd.randrange(len(self.material.hostile) + len(made))
        return (self.material.hostile[pick] if pick < len(self.material.hostile)
                else made[pick - len(self.material.hostile)]())

    def big(self) -> Any:
        """A header value sized up to (and just over) what fits a frame."""
        size = self.size(FRAME_MAX + 1)
        makers: list[Callable[[], Any]] = [
            lambda: self.sized_text(FRAME_MAX + 1), lambda: self.deep_json(FRAME_MAX // 11),
            lambda: self.rnd.randbytes(size), lambda: [0] * (size // 5),
            lambda: {f"k{i}": i for i in range(size // 12)}]
        return self.rnd.choice(makers)()

    def broken_field(self) -> Field:
        """A field type byte AMQP does not define, or a long string whose length lies."""
        if self.chance(0.5):
            kind = self.rnd.choice([bytes([b]) for b in range(256)
                                    if bytes([b]) not in KNOWN_FIELD_TYPES])
            return Field(kind, self.rnd.randbytes(self.rnd.randint(0, 16)))
        lie = struct.pack(">I", self.rnd.getrandbits(32))
        return Field(self.rnd.choice([b"S", b"x", b"A", b"F"]),
                     lie + self.rnd.randbytes(self.rnd.randint(0, 8)))


# -- headers: plausible, then mutated -------------------------------------------------------

def _mutated(pick: _Pick, plausible: dict[str, Any]) -> dict[str, Any] | None:
    """``plausible`` with a few headers dropped, replaced by hostile values, or added; now
    and then one sized up to the frame limit, very many, a broken field, or no table."""
    rnd = pick.rnd
    if pick.chance(0.04):
        return rnd.choice([None, {}])
    headers = dict(plausible)

    def name() -> str:
        which = rnd.random()
        return (rnd.choice(HEADER_NAMES) if which < 0.4 else
                rnd.choice(sorted(plausible)) if which < 0.8 else pick.shortstr())

    for _ in range(rnd.choice([0, 1, 1, 2, 2, 3, 5, 8])):
        if pick.chance(0.2):
            headers.pop(name(), None)
        else:
            headers[name()] = pick.hostile()
    if pick.chance(0.12):
        headers[name()] = pick.big()
    if pick.chance(0.03):
        headers.update({f"h{i}": i for i in range(pick.size(8000))})
    if pick.chance(0.02):  # the broker closes the connection over these
        headers[name()] = pick.broken_field()
    return headers


def _task_headers(aim: Aim, function_id: str, group: str) -> dict[str, Any]:
    return {protocol.H_PROTOCOL: protocol.PROTOCOL_VERSION, protocol.H_FUNCTION: function_id,
            protocol.H_ENDPOINT: aim.endpoint_id, protocol.H_USER: aim.user,
            protocol.H_GROUP: group, protocol.H_PYTHON: PYTHON_VERSION,
            protocol.H_SERIALIZER: "json 1"}


def _result_headers(aim: Aim, group: str, state: str) -> dict[str, Any]:
    return {**_task_headers(aim, aim.function_id, group), protocol.H_STATE: state,
            protocol.H_WORKER: "worker-0", protocol.H_RECEIVED: 1_700_000_000_000_000,
            protocol.H_STARTED: 1_700_000_000_000_001, protocol.H_FINISHED: 1_700_000_000_000_002,
            protocol.H_STDOUT: "out", protocol.H_STDERR: "err"}


def _deaths(pick: _Pick) -> Any:
    """``x-death`` as the broker writes it, with fields a forger changed, or not a list."""
    rnd, aim = pick.rnd, pick.aim
    if pick.chance(0.2):
        return pick.hostile()
    deaths = []
    for _ in range(rnd.choice([1, 1, 2, 3])):
        death: dict[str, Any] = {
            "reason": rnd.choice(["rejected", "expired", "maxlen", "delivery_limit"]),
            "queue": aim.topology.queue("endpoint_tasks", endpoint_id=aim.endpoint_id).name,
            "count": rnd.randint(1, 5), "exchange": aim.topology.exchange("tasks"),
            "routing-keys": [aim.endpoint_id]}
        for key in rnd.sample(["reason", "queue", "count", "time", "routing-keys"], rnd.randint(0, 2)):
            death[key] = pick.hostile()
        deaths.append(death)
    return deaths


# -- bodies -----------------------------------------------------------------------------------

def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def _model_body(pick: _Pick, fields: dict[str, Any]) -> bytes:
    """A JSON object shaped like one of the fabric's models, a few fields wrong or missing."""
    data = dict(fields)
    for name in pick.rnd.sample(sorted(fields), pick.rnd.randint(0, min(3, len(fields)))):
        if pick.chance(0.7):
            data[name] = pick.rnd.choice(pick.material.wrong_json)
        else:
            data.pop(name)
    return _json_bytes(data)


def _body(pick: _Pick, *models: dict[str, Any], pickles: bool = True) -> bytes:
    """Garbage, JSON that looks right or is hostile, a model's JSON (twice as likely), or
    (``pickles``) a marker pickle."""
    rnd, values = pick.rnd, pick.material.json_values
    kinds: list[Callable[[], bytes]] = [
        lambda: rnd.randbytes(pick.size(MAX_BODY)),
        lambda: _json_bytes({"args": rnd.sample(values, rnd.randint(0, len(values))),
                             "kwargs": {str(i): v for i, v in enumerate(values)}}),
        lambda: pick.deep_json(MAX_JSON_DEPTH).encode(),
        lambda: rnd.choice(_NASTY_BODIES),
        *[lambda fields=fields: _model_body(pick, fields) for fields in models] * 2]
    if pickles:
        kinds.append(pick.marker_pickle)
    return rnd.choice(kinds)()


def _event_models(pick: _Pick) -> list[dict[str, Any]]:
    aim, task_ids = pick.aim, pick.material.id_lists[0]
    heartbeat = {"endpoint_id": aim.endpoint_id, "hostname": "h", "pid": 1, "sent": 1.7e9,
                 "period": 1.0, "started": 1.7e9, "engine": "processes", "workers": 2,
                 "workers_busy": 0, "tasks_received": 0, "tasks_succeeded": 0, "tasks_failed": 0}
    return [heartbeat,
            {"task_group_id": pick.id(), "endpoint_id": aim.endpoint_id, "user": aim.user,
             "task_ids": task_ids, "submitted": 1.7e9},
            {"task_ids": task_ids, "user": aim.user, "sent": 1.7e9}]


# -- properties and messages ------------------------------------------------------------------

def _properties(pick: _Pick, headers: dict[str, Any] | None, *, content_type: str | None,
                group: str) -> WireProperties:
    """Properties around ``headers``: plausible ids and content type, or hostile ones."""
    rnd = pick.rnd

    def maybe(plausible: Any, hostile: Callable[[], Any], odds: float = 0.3) -> Any:
        return hostile() if pick.chance(odds) else plausible

    def shortstr() -> str | None:
        return None if pick.chance(0.2) else pick.shortstr()

    return WireProperties(
        message_id=maybe(uuid.UUID(int=rnd.getrandbits(128)).hex, shortstr),
        correlation_id=maybe(group, shortstr),
        content_type=maybe(content_type, lambda: rnd.choice([None, *CONTENT_TYPES])),
        content_encoding=maybe(None, lambda: rnd.choice(["gzip", "", "\x00"]), 0.05),
        headers=headers,
        delivery_mode=rnd.choice([None, 1, 2]),
        priority=maybe(None, lambda: rnd.randint(0, 255), 0.1),
        expiration=maybe(None, lambda: rnd.choice(["0", "1", "60000"]), 0.05),
        timestamp=maybe(None, lambda: rnd.getrandbits(64), 0.1),
        type=maybe(None, shortstr, 0.1),
        reply_to=maybe(None, shortstr, 0.1),
        app_id=maybe(None, shortstr, 0.1),
    )


def _task(pick: _Pick) -> WireMessage:
    """A task for the agent: its routing key, plausible headers under mutation."""
    aim = pick.aim
    calls_real_function = pick.chance(0.3)
    function_id = aim.function_id if calls_real_function else pick.id()
    group = pick.id()
    headers = _mutated(pick, _task_headers(aim, function_id, group))
    if calls_real_function:
        # The one call the endpoint runs by design: JSON only, so no pickle is ever loaded.
        if headers is not None:
            headers[protocol.H_FUNCTION] = function_id
        properties = _properties(pick, headers, content_type="application/json", group=group)
        properties.content_type = "application/json"
        body = _body(pick, pickles=False)
    else:
        properties = _properties(pick, headers, group=group,
                                 content_type=pick.rnd.choice(CONTENT_TYPES))
        body = _body(pick)
    return WireMessage("agent tasks", aim.topology.exchange("tasks"), aim.endpoint_id,
                       properties, body)


def _command(pick: _Pick) -> WireMessage:
    """A cancel command (or an impostor) for the agent."""
    aim = pick.aim
    kind = "cancel" if pick.chance(0.7) else pick.hostile()
    headers = _mutated(pick, {protocol.H_PROTOCOL: 1, protocol.H_EVENT: kind})
    properties = _properties(pick, headers, content_type="application/json", group="")
    return WireMessage("agent commands", aim.topology.exchange("commands"), aim.endpoint_id,
                       properties, _body(pick, _event_models(pick)[-1]))


def _result_parts(pick: _Pick) -> tuple[WireProperties, bytes]:
    group = pick.id()
    headers = _mutated(pick, _result_headers(pick.aim, group,
                                             pick.rnd.choice(["success", "failed", "cancelled"])))
    properties = _properties(pick, headers, group=group,
                             content_type=pick.rnd.choice(CONTENT_TYPES))
    return properties, _body(pick, {"type": "ValueError", "message": "m", "traceback": "tb"})


def _result(pick: _Pick) -> WireMessage:
    """A result under a ``<user>.<group>`` key: the ledger reads every one."""
    words = [pick.id() if pick.chance(0.9) else pick.rnd.choice(["#", "*", "", "a.b"])
             for _ in range(2)]
    key = pick.aim.topology.routing_key("result", user=words[0], task_group_id=words[1])
    return WireMessage("gc.results", pick.aim.topology.exchange("results"), key,
                       *_result_parts(pick))


def _event_parts(pick: _Pick) -> tuple[WireProperties, bytes]:
    kind = (pick.rnd.choice(["heartbeat", "group-manifest", "cancel"]) if pick.chance(0.8)
            else pick.hostile())
    headers = _mutated(pick, {protocol.H_PROTOCOL: 1, protocol.H_EVENT: kind})
    properties = _properties(pick, headers, content_type="application/json", group="")
    return properties, _body(pick, *_event_models(pick))


def _event(pick: _Pick) -> WireMessage:
    """A heartbeat, manifest or impostor on gc.events."""
    topology, word = pick.aim.topology, pick.id()
    key = pick.rnd.choice([topology.routing_key("heartbeat", endpoint_id=word),
                           topology.routing_key("group_submitted", task_group_id=word), word])
    return WireMessage("gc.events", topology.exchange("events"), key, *_event_parts(pick))


def _dead_letter_parts(pick: _Pick) -> tuple[WireProperties, bytes]:
    group = pick.id()
    plausible = {**_task_headers(pick.aim, pick.id(), group), "x-death": _deaths(pick),
                 "x-first-death-reason": "rejected", "x-delivery-count": pick.rnd.randint(0, 5)}
    properties = _properties(pick, _mutated(pick, plausible), group=group,
                             content_type=pick.rnd.choice(CONTENT_TYPES))
    return properties, _body(pick)


def _dead_letter(pick: _Pick) -> WireMessage:
    """A forged dead letter on gc.dead (a headers exchange: the routing key means nothing)."""
    return WireMessage("gc.dead", pick.aim.topology.exchange("dead"), pick.shortstr(),
                       *_dead_letter_parts(pick))


def _straight_to_ledger(pick: _Pick) -> WireMessage:
    """A result, event or dead letter straight into gc.ledger (the default exchange)."""
    parts = pick.rnd.choice([_result_parts, _event_parts, _dead_letter_parts])
    return WireMessage("gc.ledger", "", pick.aim.topology.queue("ledger").name, *parts(pick))


#: Every target, by the name the figures use, and how to make a message for it.
TARGETS: dict[str, Callable[[_Pick], WireMessage]] = {
    "agent tasks": _task, "agent commands": _command, "gc.results": _result,
    "gc.events": _event, "gc.ledger": _straight_to_ledger, "gc.dead": _dead_letter}


def compose(target: str, rnd: random.Random, aim: Aim, material: Material) -> WireMessage:
    """A message for ``target`` from hypothesis's ``material``, weighted and sized by ``rnd``."""
    return TARGETS[target](_Pick(rnd, aim, material))


def describe(message: WireMessage) -> str:
    """One line saying what a message was, for failure reports (no bodies, short values)."""
    p = message.properties
    headers = p.headers if isinstance(p.headers, dict) else {}
    shown = ", ".join(f"{name[:40]!r}: {_shape(value)}" for name, value in list(headers.items())[:12])
    more = f" (+{len(headers) - 12} more)" if len(headers) > 12 else ""
    return (f"{message.target} via {message.exchange or '(default)'}/{message.routing_key[:60]!r}: "
            f"message_id={_shape(p.message_id)} correlation_id={_shape(p.correlation_id)} "
            f"content_type={_shape(p.content_type)} headers={{{shown}}}{more} "
            f"body {len(message.body):,} bytes {message.body[:24]!r}")


def _shape(value: Any) -> str:
    if isinstance(value, (str, bytes)) and len(value) > 40:
        return f"{type(value).__name__}[{len(value)}] {value[:16]!r}…"
    if isinstance(value, dict):
        return f"table[{len(value)}]"
    if isinstance(value, list):
        return f"array[{len(value)}]"
    if isinstance(value, Field):
        return f"field {value.kind!r} {value.payload[:12]!r}"
    return repr(value)
