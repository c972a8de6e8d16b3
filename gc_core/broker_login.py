"""How a session reaches and logs in to a broker: what its URL carries and means.

A secured broker (``broker_config/rabbitmq.conf``) takes a :class:`TokenLogin`: the
registry token is the password. A broker URL may name the CA file that verifies an
``amqps://`` broker (:func:`broker_tls`); a certificate that fails the check is explained
by :func:`certificate_refusal`. Both sessions, :mod:`gc_core.broker` (pika) and
:mod:`gc_core.broker_async` (aio-pika), read a URL the same way through this module, and
show it only through :func:`redact_url`. One setting may name several brokers, the nodes of a
cluster (:func:`broker_urls`). No AMQP library is imported here.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from gc_core.errors import ConfigError, find_certificate_failure

__all__ = ["CA_FILE_PARAMETER", "HEARTBEAT_SECONDS", "TokenLogin", "broker_tls", "broker_urls",
           "broker_urls_on_port", "broker_vhost", "certificate_refusal", "redact_url", "token_login"]

#: AMQP heartbeat (seconds) unless the URL sets one: a dead peer is noticed within ~2x this.
HEARTBEAT_SECONDS = 20
#: The broker URL's query parameter naming the CA file that verifies an ``amqps://`` broker's
#: certificate (aiormq's name for it); without it the system's trust store does.
CA_FILE_PARAMETER = "cafile"
#: aiormq's other TLS parameters and pika's own, refused: a URL means the same to both
#: sessions, and nothing switches verification off.
_OTHER_TLS_PARAMETERS = frozenset({"capath", "cadata", "certfile", "keyfile", "no_verify_ssl",
                                   "ssl_options"})
#: OpenSSL's verify codes for a certificate that does not name the host connected to
#: (X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH).
_NAME_MISMATCHES = frozenset({62, 64})


@dataclass(frozen=True)
class TokenLogin:
    """Log in to a secured broker as ``username`` (a user, or ``endpoint-<id>`` for an agent)
    with a registry token as the password."""

    username: str
    token: str = field(repr=False)
    #: What to do when the broker refuses the token, for the error message.
    remedy: str = "run `gc-client login` with a valid token"

    def apply(self, url: str) -> str:
        """``url`` with these credentials in place of its own."""
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        netloc = f"{quote(self.username, safe='')}:{quote(self.token, safe='')}@{host}" + (
            f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    def refusal(self, url: str, vhost_refused: bool) -> str:
        """One line saying the broker refused this login, and what to do."""
        if vhost_refused:
            return (f"the broker at {redact_url(url)} refused {self.username} access to its "
                    "virtual host: the registry knows no such user or endpoint, or this is not "
                    "the fabric's vhost")
        return (f"the broker at {redact_url(url)} refused the token for {self.username}: it is "
                f"unknown, revoked or expired, or not {self.username}'s; {self.remedy}")


def token_login(url: str, username: str, token: str | None, *,
                remedy: str = TokenLogin.remedy) -> TokenLogin | None:
    """Log in with ``token`` when there is one and ``url`` names no user of its own (a URL
    with credentials, like the demo's guest one, keeps them: an open broker knows no tokens)."""
    if token is None or urlsplit(url).username:
        return None
    return TokenLogin(username, token, remedy)


def broker_urls(value: str) -> list[str]:
    """The brokers one setting names: a URL, or the nodes of a cluster as URLs separated by
    commas (``GC_BROKER_URL``, an agent's ``broker_url``, ``gc-registry --broker-url``).
    A session connects to the first that answers and, when its node fails, to the next.

    Raises:
        ConfigError: no URL at all, or URLs that name different users or virtual hosts (a
            cluster's nodes share both; a session logs in to each the same way).
    """
    urls = [url.strip() for url in value.split(",") if url.strip()]
    if not urls:
        raise ConfigError("no broker URL given: write amqp://user:password@host:5672/vhost, "
                          "or several such URLs separated by commas for a cluster")
    if len({(urlsplit(url).username, broker_vhost(url)) for url in urls}) > 1:
        raise ConfigError(f"the broker URLs {redact_url(value)} name different users or virtual "
                          "hosts: they must be nodes of one cluster, reached with one login on "
                          "one vhost")
    return urls


def broker_urls_on_port(value: str, port: int) -> str:
    """The brokers ``value`` names (:func:`broker_urls`), each reached on ``port`` instead:
    Globus Compute's ``amqp_port``, for a network where only that port is open.

    >>> broker_urls_on_port("amqps://u:p@a:5671/v,amqps://u:p@[::1]/v", 443)
    'amqps://u:p@a:443/v,amqps://u:p@[::1]:443/v'
    """
    moved = []
    for url in broker_urls(value):
        parts = urlsplit(url)
        login = parts.netloc.rpartition("@")[0]
        host = parts.hostname or "localhost"
        host = f"[{host}]" if ":" in host else host
        moved.append(urlunsplit(parts._replace(
            netloc=f"{login}{'@' if login else ''}{host}:{port}")))
    return ",".join(moved)


def broker_vhost(url: str) -> str:
    """The virtual host a broker URL names (every node's: see :func:`broker_urls`), as pika
    and aio-pika read it: none, or ``/``, is ``/``."""
    path = urlsplit(url.split(",", 1)[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def redact_url(url: str) -> str:
    """The URL (or comma-separated URLs) without passwords, for messages and logs."""
    if "," in url:
        return ",".join(redact_url(node) for node in url.split(","))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def broker_tls(url: str) -> tuple[str, ssl.SSLContext | None]:
    """``url`` without its ``cafile`` parameter, and the TLS context to reach it with: for
    ``amqps://`` one that checks the broker's certificate and host name against that CA file,
    or else the system's trust store; None for ``amqp://``.

    Raises:
        ValueError: the URL sets TLS options we do not take, or names a CA file that is
            unreadable or that a plaintext ``amqp://`` URL would ignore.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    refused = sorted({name for name, _ in query} & _OTHER_TLS_PARAMETERS)
    if refused:
        raise ValueError(f"the broker URL {redact_url(url)} sets {', '.join(refused)}: only "
                         f"{CA_FILE_PARAMETER} is taken, and certificates are always verified")
    cafile = dict(query).get(CA_FILE_PARAMETER) or None
    bare = urlunsplit(parts._replace(
        query=urlencode([(name, value) for name, value in query if name != CA_FILE_PARAMETER])))
    if parts.scheme != "amqps":
        if cafile is not None:
            raise ValueError(f"the broker URL {redact_url(url)} names a CA file but does not "
                             "encrypt: write amqps:// (and the broker's TLS port)")
        return bare, None
    try:
        return bare, ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the CA file {cafile} that the broker URL names: "
                         f"{exc}") from exc


def certificate_refusal(url: str, error: BaseException) -> str | None:
    """One sentence for a broker whose certificate failed verification, or None when
    ``error`` is something else."""
    failure = find_certificate_failure(error)
    if failure is None:
        return None
    parts = urlsplit(url)
    broker = redact_url(urlunsplit(parts._replace(query="")))
    if failure.verify_code in _NAME_MISMATCHES:
        return (f"the broker at {broker} presented a certificate that is not valid for "
                f"{parts.hostname}; connect by a name the certificate holds")
    cafile = dict(parse_qsl(parts.query)).get(CA_FILE_PARAMETER)
    trusted = f"the CA in {cafile}" if cafile else "the system's trust store"
    return (f"the broker at {broker} presented a certificate not signed by {trusted} "
            f"({failure.verify_message or failure}); set {CA_FILE_PARAMETER}=<PEM file> in the "
            "broker URL to the CA that signed it")
