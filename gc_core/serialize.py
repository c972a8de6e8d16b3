"""Serialization strategies, looked up by AMQP content type against an allow-list.

cloudpickle carries arbitrary Python (functions, closures, numpy arrays) between
matching Python versions; JSON lets a service in any language call a function.
Pickle-like strategies can run code on load, so a receiver lists what it accepts.
"""

from __future__ import annotations

import json
import pickle
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from gc_core.errors import SerializationError, SerializerNotAllowed, UnknownSerializer

__all__ = [
    "CLOUDPICKLE",
    "JSON",
    "PYTHON_VERSION",
    "SERIALIZERS",
    "Serializer",
    "check_allowed",
    "get_serializer",
    "python_minor",
]

#: This interpreter's version, recorded in every message we send.
PYTHON_VERSION = platform.python_version()


@dataclass(frozen=True)
class Serializer:
    """One strategy: a content type, a short name, a version, and the two directions."""

    content_type: str
    name: str
    version: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]

    @property
    def label(self) -> str:
        """``name version``, as sent in message headers."""
        return f"{self.name} {self.version}"


def _json_dumps(value: Any) -> bytes:
    try:
        # NaN and Infinity are not JSON; a strict parser in another language would choke.
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise SerializationError(
            f"value of type {type(value).__name__} cannot be sent as JSON: {exc}; "
            "return plain lists, dicts, strings and numbers, or use the cloudpickle serializer"
        ) from exc


def _json_loads(data: bytes) -> Any:
    return json.loads(data)


#: Types plain pickle writes exactly as cloudpickle would (by value, nothing by reference).
_PLAIN_SCALARS = (int, float, complex, str, bytes, bool, type(None))
#: Containers checked element by element before taking the fast path; larger ones go to
#: cloudpickle rather than being walked.
PLAIN_CHECK_LIMIT = 64


def _is_plain(value: Any, budget: list[int]) -> bool:
    """Built-in data only, small enough to check: safe for the standard pickler."""
    budget[0] -= 1
    if budget[0] < 0:
        return False
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return True
    # loops, not all(<generator>): each call is on the submit path, and a generator is an
    # object for the cyclic collector to count
    if kind is tuple or kind is list:
        for item in value:  # noqa: SIM110 - the loop is the point (above)
            if not _is_plain(item, budget):
                return False
        return True
    if kind is dict:
        for key, item in value.items():  # noqa: SIM110 - the loop is the point (above)
            if type(key) is not str or not _is_plain(item, budget):
                return False
        return True
    return False


def _pickle_dumps(value: Any) -> bytes:
    # cloudpickle costs ~50 us per call even for ((), {}): plain data takes the standard
    # pickler (same bytes semantics; pickle.loads reads both).
    if _is_plain(value, [PLAIN_CHECK_LIMIT]):
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    data: bytes = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return data


CLOUDPICKLE = Serializer(
    content_type="application/vnd.gc.cloudpickle",
    name="cloudpickle",
    version=cloudpickle.__version__,
    dumps=_pickle_dumps,
    loads=pickle.loads,
)

JSON = Serializer(
    content_type="application/json",
    name="json",
    version="1",
    dumps=_json_dumps,
    loads=_json_loads,
)

#: Every strategy this build knows, by content type.
SERIALIZERS: dict[str, Serializer] = {s.content_type: s for s in (CLOUDPICKLE, JSON)}


def get_serializer(content_type_or_name: str) -> Serializer:
    """Find a serializer by content type or short name.

    Raises:
        UnknownSerializer: nothing is registered under that content type or name.
    """
    found = SERIALIZERS.get(content_type_or_name)
    if found is None:
        found = next((s for s in SERIALIZERS.values() if s.name == content_type_or_name), None)
    if found is None:
        raise UnknownSerializer(content_type_or_name, sorted(SERIALIZERS))
    return found


def check_allowed(serializer: Serializer, allowed: frozenset[str]) -> None:
    """Refuse a serializer whose short name is not in ``allowed``."""
    if serializer.name not in allowed:
        raise SerializerNotAllowed(serializer.content_type, sorted(allowed))


def python_minor(version: str) -> str:
    """``3.11.7`` -> ``3.11``: pickled code objects need the same major.minor."""
    return ".".join(version.split(".")[:2])
