"""Encryption: every part of the fabric reaches the broker over ``amqps://`` and the registry over
HTTPS, checks the certificate and the host name, and refuses an impostor in one clear sentence.

One private secured node for the module listens for AMQPS only (no plaintext listener), with
a certificate for ``localhost`` from a CA made here with the ``openssl`` CLI. The registry the
node asks runs in a thread (its ledger consumes over AMQPS); a second replica on the same
database serves HTTPS (``gc-registry serve --ssl-certfile/--ssl-keyfile``) to the client and
the agent. ``127.0.0.1`` is a name the certificate does not hold, and a second CA signed
nothing the servers present: they are the wrong host name and the wrong CA.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import pytest

from gc_client import AsyncExecutor, Client, Executor
from gc_core.broker_async import AsyncBrokerSession
from gc_core.errors import BrokerError, GCError
from gc_core.topology import load_topology
from tests.fabric import START_TIMEOUT, Endpoint, eventually, free_port
from tests.secured_broker import NodeTLS, Secured, SecuredFabric, node_log, secured_world

#: Days the test certificates are valid: long enough for any run.
CERT_DAYS = 2
#: Seconds a refused TLS connection may take to be reported: no retrying a certificate.
REFUSAL_TIMEOUT = 10.0


@dataclass
class TLSWorld:
    """The secured TLS node with alice and bob, an HTTPS registry, and the files of both CAs."""

    secured: Secured
    ca: Path
    other_ca: Path
    https_registry: str

    def client(self, user: str, *, broker_url: str | None = None,
               registry_url: str | None = None) -> Client:
        return Client(broker_url=broker_url or self.secured.node.url,
                      registry_url=registry_url or self.https_registry,
                      token=self.secured.tokens[user], user=user,
                      home=str(self.secured.home / user))


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr.strip()}")


def _make_ca(directory: Path, name: str) -> Path:
    """A self-signed CA: ``<name>.pem`` and ``<name>.key``."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", str(CERT_DAYS), "-subj", f"/CN=gc-fabric test {name}",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=directory)
    return directory / f"{name}.pem"


def _make_server_cert(directory: Path, ca: Path, host: str) -> tuple[Path, Path]:
    """A server certificate for DNS name ``host`` alone, signed by ``ca``: (cert, key)."""
    (directory / "server.ext").write_text(
        f"subjectAltName=DNS:{host}\nextendedKeyUsage=serverAuth\n"
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-subj", f"/CN={host}", "-keyout", "server.key", "-out", "server.csr",
             cwd=directory)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", str(ca), "-CAkey", str(ca.with_suffix(".key")),
             "-CAcreateserial", "-days", str(CERT_DAYS), "-extfile", "server.ext",
             "-out", "server.pem", cwd=directory)
    return directory / "server.pem", directory / "server.key"


def _with_host(url: str, host: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}"))


def _with_ca(url: str, ca: Path) -> str:
    return urlunsplit(urlsplit(url)._replace(query=f"cafile={quote(str(ca))}"))


@contextmanager
def https_registry(secured: Secured, cert: Path, key: Path, ca: Path) -> Iterator[str]:
    """A second registry on the secured world's database, serving HTTPS as ``localhost``."""
    port = free_port()
    url = f"https://localhost:{port}"
    log_file = secured.home / "https-registry.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "gc-registry"), "serve",
             "--db", f"sqlite:///{secured.home / 'registry.db'}", "--host", "127.0.0.1",
             "--port", str(port), "--broker-url", secured.node.url, "--no-ledger",
             "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--log-level", "WARNING"],
            stdout=log, stderr=subprocess.STDOUT)
    trusted = ssl.create_default_context(cafile=str(ca))

    def serving() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"gc-registry serve (HTTPS) exited:\n{log_file.read_text()}")
        try:
            return httpx.get(f"{url}/health", verify=trusted).status_code == 200
        except httpx.TransportError:
            return False

    try:
        eventually(serving, START_TIMEOUT, "the HTTPS registry to serve")
        yield url
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSWorld]:
    tmp = tmp_path_factory.mktemp("tls")
    (tmp / "certs").mkdir()
    ca = _make_ca(tmp / "certs", "ca")
    other_ca = _make_ca(tmp / "certs", "other-ca")
    cert, key = _make_server_cert(tmp / "certs", ca, "localhost")
    with secured_world(tmp, NodeTLS(cert=cert, key=key, ca=ca)) as secured, \
            https_registry(secured, cert, key, ca) as registry_url:
        yield TLSWorld(secured, ca, other_ca, registry_url)


def _double(x: int) -> int:
    return 2 * x


async def _run_async(client: Client, endpoint_id: str) -> list[int]:
    async with AsyncExecutor(endpoint_id=endpoint_id, client=client) as ex:
        futures = [await ex.submit(_double, x) for x in range(3)]
        return [await asyncio.wait_for(f, 60) for f in futures]


def _tls_connections(world: TLSWorld) -> dict[str, set[str]]:
    """The node's client connections: user name -> the set of their ``ssl`` flags."""
    listing = world.secured.node.script("ctl", "list_connections", "--no-table-headers",
                                        "user", "ssl")
    users: dict[str, set[str]] = {}
    for line in listing.splitlines():
        user, _, tls = line.partition("\t")
        users.setdefault(user, set()).add(tls.strip())
    return users


def test_client_agent_and_ledger_run_a_task_over_amqps_and_https(
        world: TLSWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the registry's CA trusted for HTTPS (httpx's SSL_CERT_FILE; the agent inherits it)
    monkeypatch.setenv("SSL_CERT_FILE", str(world.ca))
    secured = world.secured
    fabric = SecuredFabric(broker_url=secured.node.url, registry_url=world.https_registry,
                           home=secured.home / "alice-home", vhost="/", user="alice",
                           token=secured.tokens["alice"])
    # and an endpoint configured by the CLI (its queues declared over AMQPS) and started
    endpoint: Endpoint = fabric.configure_endpoint("tls", engine="threads", workers=2,
                                                   heartbeat_period=1.0)
    endpoint.start()
    try:
        # When alice's Executor (pika) and AsyncExecutor (aio-pika) submit through the node
        with world.client("alice") as client:
            with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
                futures = [ex.submit(_double, x) for x in range(4)]
                # Then the agent runs them and the results come back to her
                assert [f.result(timeout=60) for f in futures] == [0, 2, 4, 6]
                # over TLS, as every connection the node has (it has no plaintext listener)
                connections = _tls_connections(world)
            assert asyncio.run(_run_async(client, endpoint.endpoint_id)) == [0, 2, 4]
            # And the ledger, consuming over AMQPS, recorded them for the HTTPS registry
            task_id = futures[0].task_id
            eventually(lambda: client.get_task(task_id).status == "success", 30,
                       "the ledger to record the task")
            assert client.get_result(task_id) == 0
            eventually(lambda: client.get_endpoint_status(endpoint.endpoint_id).status
                       == "online", 30, "the agent's heartbeat to reach the ledger")
        for user in ("alice", "gc-registry", f"endpoint-{endpoint.endpoint_id}"):
            assert connections.get(user) == {"true"}, connections
    except BaseException:
        print(endpoint.read_logs(), node_log(secured.node))
        raise
    finally:
        endpoint.stop_all()


def _refusal(world: TLSWorld, broker_url: str) -> str:
    """Connect with pika (a client's session) and aio-pika; both must refuse with one same
    sentence, without retrying for long."""
    with world.client("alice", broker_url=broker_url) as client, \
            pytest.raises(BrokerError) as sync_refusal:
        client.broker_session("tls-check").start(timeout=REFUSAL_TIMEOUT)
    session = AsyncBrokerSession(broker_url, name="tls-check-async", topology=load_topology(),
                                 login=client.broker_login)
    with pytest.raises(BrokerError) as async_refusal:
        asyncio.run(session.connect(timeout=REFUSAL_TIMEOUT))
    message = str(sync_refusal.value)
    assert str(async_refusal.value) == message
    assert "\n" not in message and world.secured.tokens["alice"] not in message
    return message


def test_a_broker_certificate_from_another_ca_is_refused_in_one_sentence(world: TLSWorld) -> None:
    # A client that trusts another CA than the one that signed the node's certificate
    message = _refusal(world, _with_ca(world.secured.node.url, world.other_ca))
    assert "presented a certificate" in message and str(world.other_ca) in message
    assert "cafile" in message and "the CA that signed it" in message
    # and one that names no CA checks against the system's trust store, which lacks ours
    message = _refusal(world, world.secured.node.url.partition("?")[0])
    assert "system's trust store" in message and "cafile" in message


def test_a_broker_reached_by_a_name_its_certificate_lacks_is_refused(world: TLSWorld) -> None:
    # The node's certificate is for localhost: connecting as 127.0.0.1 is a wrong host name
    message = _refusal(world, _with_host(world.secured.node.url, "127.0.0.1"))
    assert "not valid for 127.0.0.1" in message and "presented a certificate" in message


def test_no_broker_url_switches_verification_off(world: TLSWorld) -> None:
    # aiormq takes ?no_verify_ssl=1 (and its own certfile, capath, ...): an impostor's URL
    # would otherwise reach a broker that verifies for neither name nor CA
    impostor = _with_host(world.secured.node.url, "127.0.0.1").partition("?")[0]
    message = _refusal(world, f"{impostor}?no_verify_ssl=1")
    assert "no_verify_ssl" in message and "always verified" in message
    # and a CA file that cannot be read is said to be so, at once
    message = _refusal(world, _with_ca(world.secured.node.url, world.ca.with_name("missing.pem")))
    assert "cannot load the CA file" in message and "missing.pem" in message


def test_an_agent_refuses_a_broker_it_cannot_verify(world: TLSWorld,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(world.ca))
    secured = world.secured
    fabric = SecuredFabric(broker_url=secured.node.url, registry_url=world.https_registry,
                           home=secured.home / "alice-wrong-ca", vhost="/", user="alice",
                           token=secured.tokens["alice"])
    endpoint = fabric.configure_endpoint("wrong-ca", engine="threads", workers=1)
    # When its agent starts with a broker URL that trusts the wrong CA
    fabric.broker_url = _with_ca(secured.node.url, world.other_ca)
    done = fabric.cli("gc-agent", "start", endpoint.name, check=False, timeout=60)
    # Then it exits at once, saying so
    assert done.returncode != 0
    assert "presented a certificate" in done.stderr and str(world.other_ca) in done.stderr


def test_the_registry_serves_https_that_clients_verify(world: TLSWorld,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A client that trusts the registry's CA reaches it by its certificate's name
    monkeypatch.setenv("SSL_CERT_FILE", str(world.ca))
    with world.client("alice") as client:
        assert client.whoami().name == "alice"
    # but not by another name
    wrong_name = _with_host(world.https_registry, "127.0.0.1")
    with world.client("alice", registry_url=wrong_name) as client, \
            pytest.raises(GCError) as wrong_host:
        client.whoami()
    assert "not valid for '127.0.0.1'" in str(wrong_host.value)
    # and one that trusts another CA is refused too
    monkeypatch.setenv("SSL_CERT_FILE", str(world.other_ca))
    with world.client("alice") as client, pytest.raises(GCError) as wrong_ca:
        client.whoami()
    assert "presented a certificate" in str(wrong_ca.value) and "SSL_CERT_FILE" in str(wrong_ca.value)
