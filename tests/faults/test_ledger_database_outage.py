"""The ledger's database goes away for a while (PostgreSQL restarted, the network to it
cut): tasks run on, no result is lost from the ledger, and the registry waits for the
database, saying so, rather than retrying as fast as it can fail."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import httpx
import pytest

from gc_client import Client, Executor
from gc_core.registry.db import open_database
from gc_core.registry.ledger import Ledger
from gc_core.topology import load_topology
from tests.fabric import Endpoint, eventually, held_port
from tests.integration.conftest import fresh_postgres_database
from tests.integration.test_registry_replicas import _amqp_url, fabric_served_by, serving

#: Seconds the database stays away.
OUTAGE = 8.0


def triple(x: int) -> int:
    return 3 * x


class CuttableLink:
    """A TCP relay to 127.0.0.1:``target_port`` that can be cut (every connection through
    it dropped, new ones closed at once) and mended."""

    def __init__(self, target_port: int) -> None:
        self._listener = held_port()
        self._listener.listen(16)
        self.port = int(self._listener.getsockname()[1])
        self._target_port = target_port
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self.cut_off = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self.cut_off = True
            dropped, self._open = self._open, []
        for sock in dropped:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def mend(self) -> None:
        with self._lock:
            self.cut_off = False

    def close(self) -> None:
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self.cut_off:
                    near.close()
                    continue
                far = socket.create_connection(("127.0.0.1", self._target_port))
                self._open += [near, far]
            for source, sink in ((near, far), (far, near)):
                threading.Thread(target=_relay, args=(source, sink), daemon=True).start()


def _relay(source: socket.socket, sink: socket.socket) -> None:
    with suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def link_to_postgres() -> Iterator[tuple[CuttableLink, str]]:
    """A cuttable link to a fresh PostgreSQL database, and the database's URL through it."""
    with fresh_postgres_database("gc_outage") as url:
        direct = url.split("@", 1)[1].split("/", 1)[0]
        link = CuttableLink(int(direct.rsplit(":", 1)[1]))
        try:
            yield link, url.replace(direct, f"127.0.0.1:{link.port}")
        finally:
            link.close()


def test_the_ledger_waits_out_its_database_and_loses_nothing(
        own_vhost: str, tmp_path: Path, link_to_postgres: tuple[CuttableLink, str]) -> None:
    link, db_url = link_to_postgres
    home = tmp_path / "home"
    registry = serving(db_url, home, vhost=own_vhost)
    fabric = fabric_served_by(registry, home, own_vhost)
    endpoint: Endpoint = fabric.configure_endpoint("outage", workers=1)
    endpoint.start()
    try:
        with Client(broker_url=fabric.broker_url, registry_url=registry.url,
                    home=str(home)) as client, \
                Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
            assert ex.submit(triple, 0).result(timeout=60) == 0  # the function is fetched
            logged_before = len(registry.output().splitlines())
            link.cut()
            cut_at = time.monotonic()
            # Tasks run on: the registry is off their path.
            futures = [ex.submit(triple, n) for n in range(1, 41)]
            assert [f.result(timeout=60) for f in futures] == [3 * n for n in range(1, 41)]
            # The API says what is wrong rather than failing with a bare 500.
            answer = httpx.get(f"{registry.url}/tasks/{futures[0].task_id}", timeout=30)
            assert answer.status_code == 503, answer.text
            assert "database" in answer.json()["detail"]
            eventually(lambda: "waiting for its database" in httpx.get(
                f"{registry.url}/health").json()["ledger"], 30, "/health to name the database")
            time.sleep(max(0.0, OUTAGE - (time.monotonic() - cut_at)))
            during = registry.output().splitlines()[logged_before:]
            outage = time.monotonic() - cut_at
            link.mend()
            # Every result reaches the ledger once its database is back.
            eventually(lambda: all(client.get_task(f.task_id).status == "success"
                                   for f in futures), 90, "every result in the ledger")
    finally:
        endpoint.stop_all()
        registry.process.terminate()
        registry.process.wait(30)

    # It said so, and waited between tries rather than failing as fast as it could.
    attempts = [line for line in during if "ledger could not" in line]
    assert any("waiting for its database" in line for line in during), "\n".join(during[-20:])
    assert len(attempts) <= 2 * outage, f"{len(attempts)} failed commits in {outage:.0f} s"
    assert sum("Traceback" in line for line in during) <= 1


def test_an_idle_ledger_waits_out_its_database_without_spinning(
        own_vhost: str, link_to_postgres: tuple[CuttableLink, str]) -> None:
    # With nothing to write, the ledger still meets the outage (its sweep of results set
    # aside, each second with checked senders); it must then pause between tries as well,
    # not go round its loop as fast as it can.
    link, db_url = link_to_postgres
    ledger = Ledger(broker_url=_amqp_url(own_vhost), topology=load_topology(),
                    sessions=open_database(db_url), verify_senders=True, database="the test's")
    ledger.start()
    try:
        eventually(lambda: ledger.connected, 30, "the ledger to consume")
        link.cut()
        eventually(lambda: ledger.database_problem is not None, 30, "the ledger to notice")
        cpu, wall = time.process_time(), time.monotonic()
        time.sleep(4.0)
        busy = (time.process_time() - cpu) / (time.monotonic() - wall)
        link.mend()
        eventually(lambda: ledger.database_problem is None, 60, "the ledger to see it back")
    finally:
        ledger.stop()
    assert busy < 0.5, f"this process was busy {busy:.0%} of the time while the ledger waited"
