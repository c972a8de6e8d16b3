"""The Celery application shared by the Celery peer's client and its worker subprocess.

The worker runs ``celery -A bench.peers.celery_app worker -Q <queue> ...``; the client builds
its own app with ``make_app(queue)`` so that its ``.delay()`` routes to the same queue.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_ready

#: Broker URL in Celery's spelling (``//`` is the default vhost).
CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
#: Results come back over AMQP too, one reply queue per client.
CELERY_RESULT_BACKEND = "rpc://"
#: Registered name of the no-op task, the same in client and worker.
NOOP_TASK_NAME = "bench.noop"
#: Queue of the worker's app when ``-Q`` is not given (the peer always gives it).
DEFAULT_QUEUE = "bench.celery.default"
#: Line written to the worker's stdout once it consumes.
READY_MARKER = b"ready"


def _noop() -> None:
    """Do nothing: the benchmark measures the system, not the task."""


def make_app(queue: str) -> Celery:
    """Build a Celery app whose tasks go to ``queue`` and whose results come back by rpc://."""
    app = Celery("bench", broker=CELERY_BROKER_URL, backend=CELERY_RESULT_BACKEND)
    app.conf.update(
        task_default_queue=queue,
        worker_enable_remote_control=False,  # no pidbox queue per worker
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
    )
    app.task(name=NOOP_TASK_NAME)(_noop)
    return app


@worker_ready.connect  # type: ignore[untyped-decorator]
def _announce_ready(**_kwargs: Any) -> None:
    # fd 1 directly: Celery redirects sys.stdout into its logger
    os.write(1, READY_MARKER + b"\n")


app = make_app(DEFAULT_QUEUE)
