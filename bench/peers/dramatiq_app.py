"""The Dramatiq set-up shared by the Dramatiq peer's client and its worker subprocess.

The worker runs ``dramatiq bench.peers.dramatiq_app:setup_from_environment ...``: Dramatiq's
CLI calls that function, which builds the broker from the variables the peer sets (its
fresh vhost, its own results namespace) and makes it Dramatiq's global broker. The client
builds its own with ``make_broker`` and passes it around instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import Middleware
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

#: Variables naming the worker's vhost URL and results namespace.
AMQP_URL_VARIABLE = "BENCH_DRAMATIQ_AMQP_URL"
NAMESPACE_VARIABLE = "BENCH_DRAMATIQ_NAMESPACE"
#: The local Redis; keys stay apart by namespace (a prefix the peer deletes when it stops).
REDIS_URL = "redis://127.0.0.1:6379/0"
#: Queue of the no-op actor (alone in the peer's vhost).
QUEUE = "bench.dramatiq"
#: Line written to the worker's stdout once a worker process consumes.
READY_MARKER = b"ready"


def _noop() -> None:
    """Do nothing: the benchmark measures the system, not the task."""


class _AnnounceReady(Middleware):
    """Tell the peer, on stdout, that a worker process has booted and consumes."""

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        os.write(1, READY_MARKER + b"\n")


@dataclass(frozen=True)
class DramatiqSetup:
    """A broker with its Redis result backend, and the no-op actor declared on it."""

    broker: RabbitmqBroker
    backend: RedisBackend
    noop: dramatiq.Actor[[], None]


def make_broker(amqp_url: str, namespace: str) -> DramatiqSetup:
    """Build the RabbitMQ broker (Dramatiq's defaults: persistent messages, ack after the
    task, no publisher confirms) with results in Redis under ``namespace``."""
    broker = RabbitmqBroker(url=amqp_url)
    backend = RedisBackend(  # type: ignore[no-untyped-call]
        url=REDIS_URL, namespace=namespace, use_namespace_prefix_keys=True)
    broker.add_middleware(Results(backend=backend))  # type: ignore[no-untyped-call]
    broker.add_middleware(_AnnounceReady())
    noop = dramatiq.actor(actor_name="noop", queue_name=QUEUE, broker=broker, store_results=True,
                          max_retries=0)(_noop)
    return DramatiqSetup(broker=broker, backend=backend, noop=noop)


def setup_from_environment() -> None:
    """What the worker's CLI calls: the peer's broker, as Dramatiq's global broker."""
    dramatiq.set_broker(make_broker(os.environ[AMQP_URL_VARIABLE],
                                    os.environ[NAMESPACE_VARIABLE]).broker)
