"""pika made safe against what a publisher may forge in a message's headers.

pika decodes every field of every frame inside its IO loop; a value it cannot decode
raises there and drops the connection. :func:`harden_pika` replaces the decoder pika has
no hook for, so a forged header costs its message, never the session.
"""

from __future__ import annotations

import struct
from datetime import datetime, timezone
from typing import Any

import pika.data

__all__ = ["harden_pika"]

_pika_decode_value = pika.data.decode_value


def _decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
    """pika's field decoder, except that a timestamp past what ``datetime`` holds stays an
    int. pika raises there, inside its IO loop: the connection drops and the broker hands
    the same message to the next connection, for ever (one forged header, ~1,900
    reconnects, other users' tasks dead-lettered)."""
    if encoded[offset:offset + 1] == b"T":
        (seconds,) = struct.unpack_from(">Q", encoded, offset + 1)
        try:
            return datetime.fromtimestamp(seconds, timezone.utc), offset + 9
        except (OverflowError, OSError, ValueError):
            return seconds, offset + 9
    decoded: tuple[Any, int] = _pika_decode_value(encoded, offset)
    return decoded


def harden_pika() -> None:
    """Install :func:`_decode_value` as pika's field decoder (pika looks it up by module
    attribute, for nested tables and arrays too; it has no hook for this). Idempotent."""
    pika.data.decode_value = _decode_value
