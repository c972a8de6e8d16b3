"""What a broker will never take, and why: message size and header-frame checks.

A publish the broker could never take is failed at once with a :class:`Refusal` instead of
being sent: over the broker's ``max_message_size`` it would be refused and re-sent for
ever, and properties too large for one AMQP frame would make the broker close the
connection. Both sessions check sizes here; no AMQP library is imported.
"""

from __future__ import annotations

from gc_core.protocol import Envelope

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "Refusal", "header_may_overflow", "header_refusal",
           "oversize_refusal"]

#: RabbitMQ's default ``max_message_size``: a larger message is refused by the broker.
DEFAULT_MAX_MESSAGE_SIZE = 128 * 2**20
#: Bytes of header-frame framing: a message's properties must fit ``frame_max`` less this.
_FRAME_OVERHEAD = 8 + 14
#: Header bytes below which a message's properties certainly fit the smallest frame_max
#: RabbitMQ negotiates (4096); above it they are measured exactly before sending.
_SURELY_FITS = 3000


class Refusal(str):
    """Why the broker will never take a publish (too large, not encodable as AMQP, not
    permitted): sending it again cannot help, so the caller fails it instead of retrying.
    A plain ``str`` reason (a ``basic.nack``, an unroutable message) may be worth a retry."""


def oversize_refusal(size: int, limit: int) -> Refusal | None:
    """Why a message body of ``size`` bytes will never be taken by a broker whose
    ``max_message_size`` is ``limit``, or None when it fits."""
    if size <= limit:
        return None
    return Refusal(f"it is {size:,} bytes, over the broker's limit of {limit:,} bytes "
                   "(max_message_size)")


def header_may_overflow(envelope: Envelope) -> bool:
    """False when a message's properties certainly fit any frame RabbitMQ negotiates (a
    cheap guess, for every publish); True when they must be encoded and measured."""
    return _rough_header_size(envelope) >= _SURELY_FITS


def header_refusal(encoded_size: int, frame_max: int) -> str | None:
    """Why properties and headers that encode to ``encoded_size`` bytes will never fit the
    connection's header frame of ``frame_max`` bytes (0: not known), or None."""
    header = encoded_size + _FRAME_OVERHEAD
    if frame_max and header > frame_max:
        return (f"its properties and headers take {header:,} bytes, over the "
                f"{frame_max:,}-byte AMQP frame they must fit in")
    return None


def _rough_header_size(envelope: Envelope) -> int:
    """An upper-bound guess at a message's encoded properties, cheap enough for every
    publish; a nested header counts as large, so it is measured exactly."""
    size = len(envelope.message_id) + len(envelope.correlation_id) + len(envelope.content_type)
    for name, value in envelope.headers.items():
        if isinstance(value, (str, bytes)):
            size += len(name) + 4 * len(value) + 6  # 4: the most bytes a character encodes to
        elif isinstance(value, (dict, list, tuple)):
            return _SURELY_FITS
        else:
            size += len(name) + 24
    return size
