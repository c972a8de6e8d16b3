"""The one place where pika's exceptions and the broker's close frames become our errors.

:func:`translate` turns what pika raises or reports, with what the session's IO thread
knew at the time (a :class:`FailureContext`), into a :class:`~gc_core.errors.BrokerError`
chained to it: refused for good, a publish refused for good (:class:`PublishRefused`),
unreachable, or lost. The broker's close frames are told apart by AMQP reply code and by
the command they name, never by their English text.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import pika.exceptions
from pika.spec import Basic

from gc_core.broker_causes import (
    connect_failure,
    login_refusal,
    permissions_hint,
    vhost_refusal,
)
from gc_core.broker_login import TokenLogin, certificate_refusal, redact_url
from gc_core.errors import (
    BrokerError,
    BrokerRefused,
    BrokerUnreachable,
    ConnectionLost,
    PublishNotConfirmed,
)

__all__ = ["FailureContext", "PublishRefused", "describe", "translate"]


class _ReplyCode(IntEnum):
    """The AMQP 0-9-1 reply codes a session tells apart (the spec's constants). RabbitMQ
    adds an English explanation to each, which is shown to people and never matched."""

    ACCESS_REFUSED = 403
    PRECONDITION_FAILED = 406
    NOT_ALLOWED = 530


#: Basic.Publish's (class id, method id): a channel close that names it refused a publish.
_PUBLISH_METHOD = divmod(Basic.Publish.INDEX, 0x10000)
#: Reply codes that refuse the session itself when they close the channel while it is
#: still declaring (its queues' arguments, its permissions): no reconnect can fix them.
_SESSION_REFUSALS = frozenset({_ReplyCode.ACCESS_REFUSED, _ReplyCode.PRECONDITION_FAILED,
                               _ReplyCode.NOT_ALLOWED})
#: Reply codes that refuse one publish for good when they close the channel over it, and
#: whether every other unconfirmed publish to its exchange and routing key goes with it:
#: ACCESS_REFUSED is about the target (topic or exchange permissions), so all of those
#: would be refused too; PRECONDITION_FAILED is about that message (over the broker's
#: max_message_size; the user_id we stamp is always the login's), so only it fails.
_PUBLISH_REFUSALS: dict[int, bool] = {_ReplyCode.ACCESS_REFUSED: True,
                                      _ReplyCode.PRECONDITION_FAILED: False}


class PublishRefused(PublishNotConfirmed):
    """The broker closed the channel over a publish it will never take (the oldest
    unconfirmed one: confirms come in order); with ``same_target``, every unconfirmed
    publish to its exchange and routing key would be refused too."""

    def __init__(self, reply_text: str, *, same_target: bool) -> None:
        super().__init__(f"the broker refused it: {reply_text}")
        self.reply_text = reply_text
        self.same_target = same_target


@dataclass(frozen=True, slots=True)
class FailureContext:
    """What the IO thread knows when something fails, for :func:`translate`."""

    #: The URL with its password: a certificate refusal names its ``cafile``; never shown.
    url: str
    session: str
    login: TokenLogin | None
    #: Opening the connection (else it was open, or its channel was).
    opening: bool = False
    #: The channel is open and still declaring: the session is not ready yet.
    declaring: bool = False
    #: The session was connected before: a certificate it now refuses may be being replaced.
    trusted_before: bool = False
    #: The (class id, method id) a broker's Channel.Close named, when it closed the channel.
    closed_by: tuple[int, int] | None = None


def translate(error: BaseException, where: FailureContext) -> BrokerError:
    """The one place where pika's exceptions and the broker's close frames become ours.

    :class:`BrokerRefused`: no reconnect can fix it, the session stops.
    :class:`PublishRefused`: a publish fails for good, the session reconnects and goes on.
    :class:`BrokerUnreachable`: the connection did not open; retried with backoff.
    :class:`ConnectionLost`: the connection or channel closed; the session reconnects.
    Each is chained to ``error``.
    """
    translated = _translated(error, where)
    translated.__cause__ = error
    return translated


def _translated(error: BaseException, where: FailureContext) -> BrokerError:
    url = redact_url(where.url)
    if isinstance(error, ValueError):  # broker_tls: the URL or its CA file cannot be used
        return BrokerRefused(str(error))
    if where.opening:
        return _open_failure(error, where, url)
    code = getattr(error, "reply_code", 0)  # a close frame's, by the broker
    if where.declaring and code in _SESSION_REFUSALS:
        hint = f"; {permissions_hint(url)}" if code == _ReplyCode.ACCESS_REFUSED else ""
        return BrokerRefused(f"the broker at {url} refused session {where.session}: {error}{hint}")
    if isinstance(error, pika.exceptions.ChannelClosedByBroker):
        same_target = _PUBLISH_REFUSALS.get(code) if where.closed_by == _PUBLISH_METHOD else None
        if same_target is not None:
            return PublishRefused(str(error.reply_text), same_target=same_target)
        return ConnectionLost(f"channel of {where.session} closed ({error})")
    return ConnectionLost(f"connection {where.session} to {url} lost ({describe(error)})")


def _open_failure(error: BaseException, where: FailureContext, url: str) -> BrokerError:
    """A connection that did not open: refused for good, or worth another try. pika tells
    the broker's refusals apart by type (from the reply code and how far the handshake
    got): a refused login, a refused virtual host."""
    untrusted = certificate_refusal(where.url, error)
    if untrusted is not None:
        return _refused_unless_trusted_before(untrusted, where, url)
    refused = isinstance(error, (pika.exceptions.ProbableAuthenticationError,
                                 pika.exceptions.AuthenticationError))
    vhost_refused = isinstance(error, pika.exceptions.ProbableAccessDeniedError)
    if where.login is not None and (refused or vhost_refused):
        return BrokerRefused(where.login.refusal(where.url, vhost_refused=not refused))
    if refused:
        return BrokerRefused(login_refusal(where.url, describe(error)))
    if vhost_refused:  # NOT_ALLOWED: no such vhost, or no permissions on it
        return _refused_unless_trusted_before(vhost_refusal(where.url, describe(error)), where,
                                              url)
    failure = connect_failure(error, where.url)
    if failure.permanent:
        return _refused_unless_trusted_before(failure.reason, where, url)
    return BrokerUnreachable(url, failure.reason)


def _refused_unless_trusted_before(reason: str, where: FailureContext, url: str) -> BrokerError:
    """Fatal at start; a session that was connected before retries, in case the broker is
    being changed under it (its certificate replaced, a cluster node still starting the
    vhost, which refuses it meanwhile)."""
    return BrokerUnreachable(url, reason) if where.trusted_before else BrokerRefused(reason)


def describe(error: BaseException) -> str:
    """``error`` in one line of at most ~300 characters, for messages and logs."""
    text = str(error) or type(error).__name__
    return text if len(text) < 300 else text[:300] + "…"
