"""A broker that cannot be used says why and what to do, and a refusal is not retried.

Each case is real: a port nothing listens on, a host name that does not resolve, a vhost
that does not exist, a user without rights on the vhost (created with rabbitmqctl on the
shared broker and deleted afterwards), a wrong password, TLS spoken to a plain listener.
Both sessions are held to it: the pika one (agent, Executor) and the aio-pika one
(AsyncExecutor). "Not retried" is read from what the sessions log: a retried attempt logs
``retrying in``.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from gc_core.broker import BrokerSession
from gc_core.broker_async import AsyncBrokerSession
from gc_core.errors import BrokerError, BrokerRefused, BrokerUnreachable
from gc_core.topology import load_topology
from tests.conftest import BROKER_HOST, BROKER_PORT
from tests.fabric import Fabric, free_port, rabbitmqctl

#: The start timeout for refusals: a session that retried one would log retries and end
#: with BrokerUnreachable after it, not with the refusal.
PATIENT = 60.0
#: For the failures that are retried (nothing listens): the test waits this long.
BRIEF = 2.0


@dataclass(frozen=True)
class BrokerUser:
    """A broker user created for these tests (and deleted after them)."""

    name: str
    password: str


@contextmanager
def _broker_user(role: str, *permissions: str) -> Iterator[BrokerUser]:
    """A new broker user; with ``permissions`` (vhost, configure, write, read) set on them."""
    user = BrokerUser(f"gc-{role}-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}")
    rabbitmqctl("add_user", user.name, user.password)
    try:
        if permissions:
            rabbitmqctl("set_permissions", "-p", *permissions[:1], user.name, *permissions[1:])
        yield user
    finally:
        rabbitmqctl("delete_user", user.name)


@pytest.fixture(scope="module")
def outsider(vhost: str) -> Iterator[BrokerUser]:
    """A user that exists but has no permissions on the test's vhost."""
    with _broker_user("outsider") as user:
        yield user


@pytest.fixture(scope="module")
def bystander(vhost: str) -> Iterator[BrokerUser]:
    """A user who may open the vhost but may configure, write and read nothing in it."""
    with _broker_user("bystander", vhost, "^$", "^$", "^$") as user:
        yield user


def _start_sync(url: str, timeout: float) -> None:
    session = BrokerSession(url, name="causes", topology=load_topology())
    try:
        session.start(timeout=timeout)
    finally:
        session.close(timeout=2)


def _start_async(url: str, timeout: float) -> None:
    async def connect() -> None:
        session = AsyncBrokerSession(url, name="causes", topology=load_topology())
        try:
            await session.connect(timeout=timeout)
        finally:
            await session.close()

    asyncio.run(connect())


Start = Callable[[str, float], None]
SESSIONS = [pytest.param(_start_sync, id="pika"), pytest.param(_start_async, id="aio-pika")]


def _failure(start: Start, url: str, timeout: float, caplog: pytest.LogCaptureFixture
             ) -> tuple[BrokerError, list[str]]:
    """What starting a session on ``url`` raised, and the warnings it logged meanwhile."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gc_core"):
        with pytest.raises(BrokerError) as caught:
            start(url, timeout)
    return caught.value, [record.getMessage() for record in caplog.records]


def _retried(logged: list[str]) -> bool:
    return any("retrying in" in line for line in logged)


def _refused_at_once(start: Start, url: str, caplog: pytest.LogCaptureFixture) -> str:
    """The message of the refusal that starting a session on ``url`` met, after checking it
    was one (not "unreachable") and was not retried."""
    error, logged = _failure(start, url, PATIENT, caplog)
    assert isinstance(error, BrokerRefused), error
    assert not _retried(logged), logged
    return str(error)


@pytest.mark.parametrize("start", SESSIONS)
def test_a_port_nobody_listens_on_is_named_with_how_to_start_a_broker(
        start: Start, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    error, _ = _failure(start, f"amqp://guest:s3cret@127.0.0.1:{port}/%2F", BRIEF, caplog)

    assert isinstance(error, BrokerUnreachable)  # the broker may be starting: retried
    message = str(error)
    assert f"connection refused by 127.0.0.1:{port}" in message
    assert "ensure-broker.sh" in message and "GC_BROKER_URL" in message
    assert "s3cret" not in message


@pytest.mark.parametrize("start", SESSIONS)
def test_a_host_name_that_does_not_resolve_is_named(start: Start,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    error, _ = _failure(start, "amqp://guest:guest@no-such-broker.invalid:5672/%2F", BRIEF,
                        caplog)

    assert "'no-such-broker.invalid' does not resolve" in str(error)


@pytest.mark.parametrize("start", SESSIONS)
def test_a_vhost_that_does_not_exist_is_refused_at_once_saying_how_to_create_it(
        start: Start, caplog: pytest.LogCaptureFixture) -> None:
    missing = f"gc-missing-{uuid.uuid4().hex[:8]}"
    url = f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{missing}"

    message = _refused_at_once(start, url, caplog)

    assert f"refused access to virtual host '{missing}' for user 'guest'" in message
    assert f"rabbitmqctl add_vhost {missing}" in message and "cannot reach" not in message


@pytest.mark.parametrize("start", SESSIONS)
def test_a_user_without_rights_on_the_vhost_is_refused_at_once_saying_how_to_grant_them(
        start: Start, vhost: str, outsider: BrokerUser, caplog: pytest.LogCaptureFixture) -> None:
    url = f"amqp://{outsider.name}:{outsider.password}@{BROKER_HOST}:{BROKER_PORT}/{vhost}"

    message = _refused_at_once(start, url, caplog)

    assert f"virtual host '{vhost}' for user '{outsider.name}'" in message
    assert f"rabbitmqctl set_permissions -p {vhost} {outsider.name}" in message
    assert outsider.password not in message


@pytest.mark.parametrize("start", SESSIONS)
def test_a_wrong_password_is_refused_at_once(start: Start, vhost: str, outsider: BrokerUser,
                                             caplog: pytest.LogCaptureFixture) -> None:
    url = f"amqp://{outsider.name}:not-{outsider.password}@{BROKER_HOST}:{BROKER_PORT}/{vhost}"

    message = _refused_at_once(start, url, caplog)

    assert f"refused the login of user '{outsider.name}'" in message
    assert outsider.password not in message


@pytest.mark.parametrize("start", SESSIONS)
def test_a_user_refused_its_declarations_is_not_retried(
        start: Start, vhost: str, bystander: BrokerUser, caplog: pytest.LogCaptureFixture) -> None:
    url = f"amqp://{bystander.name}:{bystander.password}@{BROKER_HOST}:{BROKER_PORT}/{vhost}"

    error, logged = _failure(start, url, PATIENT, caplog)

    assert not isinstance(error, BrokerUnreachable), error
    assert not _retried(logged), logged
    message = str(error)
    assert "ACCESS_REFUSED" in message and bystander.password not in message
    assert f"rabbitmqctl set_permissions -p {vhost} {bystander.name}" in message


@pytest.mark.parametrize("start", SESSIONS)
def test_tls_spoken_to_a_plain_listener_is_refused_saying_which_scheme_to_use(
        start: Start, caplog: pytest.LogCaptureFixture) -> None:
    url = f"amqps://guest:guest@{BROKER_HOST}:{BROKER_PORT}/%2F"

    message = _refused_at_once(start, url, caplog)

    assert f"TLS handshake with {BROKER_HOST}:{BROKER_PORT} failed" in message
    assert "write amqp://" in message


def test_an_agent_on_a_missing_vhost_exits_with_the_cause_instead_of_retrying(
        fabric: Fabric) -> None:
    # Given an endpoint configured on the fabric's vhost, whose agent would keep trying a
    # broker it cannot reach for its whole connect_timeout (30 s)
    name = f"causes-{uuid.uuid4().hex[:8]}"
    fabric.cli("gc-agent", "configure", name, "--engine", "threads", "--workers", "1")
    missing = f"gc-missing-{uuid.uuid4().hex[:8]}"
    env = {**fabric.env,
           "GC_BROKER_URL": f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{missing}"}
    # When it starts on a vhost that does not exist
    done = subprocess.run([str(Path(sys.executable).parent / "gc-agent"), "start", name],
                          env=env, capture_output=True, text=True, timeout=120)
    # Then it stops at once, saying so
    assert done.returncode == 1, done.stderr
    assert f"refused access to virtual host '{missing}'" in done.stderr
    assert "retrying in" not in done.stderr and "Traceback" not in done.stderr
