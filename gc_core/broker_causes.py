"""Why a connection to a broker did not open, said so that a newcomer knows what to do.

Both sessions, :mod:`gc_core.broker` (pika) and :mod:`gc_core.broker_async` (aio-pika),
explain a failed connection with these sentences, so one failure reads the same from
either: the socket error underneath (refused, unknown host, no answer, a TLS handshake
that failed), a login or a virtual host the broker refused. Whether a failure is worth
another try is :func:`connect_failure`'s ``permanent``. No AMQP library is imported here:
the AMQP libraries' wrappers are walked through, to the socket or TLS error inside.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from gc_core.broker_login import broker_vhost, redact_url

__all__ = ["ConnectFailure", "connect_failure", "login_refusal", "permissions_hint", "vhost_refusal"]

#: Where the broker URL is set, for the advice.
_URL_SETTING = "the broker URL (GC_BROKER_URL, or the endpoint's broker_url)"
#: The modules of the socket and TLS errors underneath an AMQP library's own.
_OS_ERROR_MODULES = frozenset({"builtins", "socket", "ssl"})
#: TLS errors that a peer going away mid-handshake causes: a restart, not a misconfiguration.
_TLS_CUT_SHORT = (ssl.SSLEOFError, ssl.SSLZeroReturnError)


@dataclass(frozen=True)
class ConnectFailure:
    """One failed attempt to connect: the sentence to show, and whether retrying is useless."""

    reason: str
    #: True when only a change of configuration can fix it (another try gets the same).
    permanent: bool


def connect_failure(error: BaseException, url: str) -> ConnectFailure:
    """What the socket or TLS error behind ``error`` means for ``url``, and what to do.

    >>> connect_failure(ConnectionRefusedError(111, "Connection refused"),
    ...                 "amqp://u:p@h:1/").reason.split(":")[0]
    'connection refused by h'
    """
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    where = f"{host}:{port}"
    cause = _socket_error(error)
    if isinstance(cause, ssl.SSLError) and not isinstance(cause, _TLS_CUT_SHORT):
        return ConnectFailure(
            f"the TLS handshake with {where} failed ({cause.reason or cause}): an amqps:// URL "
            f"needs the broker's TLS listener (5671 by default); for a plain listener write "
            f"amqp:// in {_URL_SETTING}", permanent=True)
    if isinstance(cause, socket.gaierror):
        return ConnectFailure(f"the host name {host!r} does not resolve ({cause.strerror}); "
                              f"correct the host in {_URL_SETTING}", permanent=False)
    if isinstance(cause, ConnectionRefusedError):
        return ConnectFailure(
            f"connection refused by {where}: no broker listens there. Start RabbitMQ "
            f"(deploy/rabbitmq/ensure-broker.sh, or `systemctl start rabbitmq-server`), or "
            f"correct the host and port in {_URL_SETTING}", permanent=False)
    if isinstance(cause, TimeoutError) or (cause is not None and cause.errno == errno.ETIMEDOUT):
        return ConnectFailure(f"{where} did not answer in time; check that the host is up and "
                              f"that no firewall drops port {port}", permanent=False)
    if cause is not None:
        return ConnectFailure(f"{cause.strerror or cause} ({where})", permanent=False)
    return ConnectFailure(_one_line(error), permanent=False)


def vhost_refusal(url: str, broker_said: str = "") -> str:
    """The sentence for a broker that refused the URL's virtual host when the connection
    opened it (AMQP's NOT_ALLOWED): no such vhost, or no permissions on it for the user."""
    vhost, user = broker_vhost(url), unquote(urlsplit(url.split(",", 1)[0]).username or "guest")
    said = f" ({broker_said})" if broker_said else ""
    return (f"the broker at {redact_url(url)} refused access to virtual host {vhost!r} for user "
            f"{user!r}{said}: the vhost does not exist, or the user has no permissions on it. "
            f"Create it and grant them (`rabbitmqctl add_vhost {vhost}`, then `rabbitmqctl "
            f"set_permissions -p {vhost} {user} '.*' '.*' '.*'`), or correct the vhost (the "
            f"URL's path; %2F is /) in {_URL_SETTING}")


def login_refusal(url: str, broker_said: str = "") -> str:
    """The sentence for a broker that refused the URL's user name and password."""
    user = unquote(urlsplit(url.split(",", 1)[0]).username or "guest")
    said = f" ({broker_said})" if broker_said else ""
    return (f"the broker at {redact_url(url)} refused the login of user {user!r}{said}: a wrong "
            f"user name or password in {_URL_SETTING}, or no such user (`rabbitmqctl "
            f"list_users`); RabbitMQ lets 'guest' log in from localhost only")


def permissions_hint(url: str) -> str:
    """What to do when the broker refused the URL's user an exchange or queue (ACCESS_REFUSED)."""
    vhost, user = broker_vhost(url), unquote(urlsplit(url.split(",", 1)[0]).username or "guest")
    return (f"user {user!r} lacks the permissions this needs on virtual host {vhost!r}: see "
            f"`rabbitmqctl list_user_permissions {user}` and grant them with `rabbitmqctl "
            f"set_permissions -p {vhost} {user} ...`; on a broker that checks tokens, the "
            "registry's policies decide")


def _socket_error(error: BaseException) -> OSError | None:
    """The socket or TLS error that the AMQP libraries wrapped ``error`` around, if any."""
    for found in _chain(error):
        if isinstance(found, OSError) and type(found).__module__ in _OS_ERROR_MODULES:
            return found
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it wraps: its cause (aiormq's), and what pika keeps in a connector
    error's ``exception``, a workflow error's ``exceptions`` and an error's ``args``."""
    pending: list[object] = [error]
    seen: set[int] = set()
    while pending and len(seen) < 50:  # the chains are short; a cycle must not loop
        found = pending.pop(0)
        if not isinstance(found, BaseException) or id(found) in seen:
            continue
        seen.add(id(found))
        yield found
        # Not __context__: an error met while handling another is not its cause.
        pending += [found.__cause__, getattr(found, "exception", None),
                    *getattr(found, "exceptions", ()), *found.args]


def _one_line(error: BaseException) -> str:
    text = " ".join((str(error) or type(error).__name__).split())
    return text if len(text) < 300 else text[:300] + "…"
