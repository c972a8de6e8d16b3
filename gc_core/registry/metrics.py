"""The registry's Prometheus metrics, served at ``/metrics``: API request latency and the
ledger's lag and commits.

A request is labelled by its route's template (``/tasks/{task_id}``), never its raw path,
and an unknown method or path by one word: no task id, user name or other text a caller
sends mints a series. The metrics live in prometheus_client's global registry, as one
registry process serves one app; the state of the app's ledger is read at each scrape.
``/metrics`` answers without a token, as Prometheus scrapes, and shows only counts and
timings.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gc_core.protocol import GroupManifest, Heartbeat, ResultMessage

if TYPE_CHECKING:  # the ledger imports this module
    from gc_core.registry.ledger import Ledger

__all__ = ["instrument", "observe_commit"]

#: Methods the API answers; any other counts as "other".
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The route label of a request no route matched (a 404 for any path).
UNMATCHED = "unmatched"
#: Seconds, for API calls: most take milliseconds; a slow database shows in the top ones.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Seconds a message may take from its sender to the ledger's commit.
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
#: Messages in one commit: the ledger commits what arrived each 200 ms, at most
#: COMMIT_RESULTS (2,000).
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
#: The ``kind`` label of what the ledger records.
_KINDS: dict[type, str] = {ResultMessage: "result", Heartbeat: "heartbeat",
                           GroupManifest: "manifest"}

REQUEST_SECONDS = Histogram(
    "gc_registry_request_duration_seconds",
    "Seconds the registry took to answer an HTTP request, by method, route template and status.",
    ["method", "route", "status"], buckets=REQUEST_BUCKETS)
LEDGER_LAG_SECONDS = Histogram(
    "gc_ledger_lag_seconds",
    "Seconds from when a result finished at its agent (or a heartbeat or manifest was sent) "
    "to the ledger's commit of it.", buckets=LAG_BUCKETS)
LEDGER_COMMIT_BATCH = Histogram(
    "gc_ledger_commit_batch_size", "Messages the ledger recorded in one commit.",
    buckets=BATCH_BUCKETS)
LEDGER_MESSAGES = Counter(
    "gc_ledger_messages", "Messages the ledger committed, by kind (result, heartbeat, manifest, "
                          "other: undecodable or not recorded).", ["kind"])


def instrument(app: FastAPI) -> None:
    """Time every request of ``app`` and serve ``/metrics`` on it."""
    app.add_middleware(_RequestTimer)
    app.include_router(_router)


def observe_commit(messages: Sequence[object]) -> None:
    """Record one ledger commit: what each delivery it settled decoded to (None for one
    that decoded to nothing to record)."""
    now = time.time()
    LEDGER_COMMIT_BATCH.observe(len(messages))
    for kind, count in collections.Counter(map(_kind, messages)).items():  # labels() a kind
        LEDGER_MESSAGES.labels(kind).inc(count)
    for message in messages:
        sent = _sent(message)
        if sent is not None:
            LEDGER_LAG_SECONDS.observe(max(0.0, now - sent))


def _sent(message: object) -> float | None:
    """When a message's news happened, by its sender's clock (None: it does not say)."""
    if isinstance(message, ResultMessage):
        return message.timings.finished or message.timings.received
    if isinstance(message, Heartbeat):
        return message.sent
    if isinstance(message, GroupManifest):
        return message.submitted
    return None


def _kind(message: object) -> str:
    return _KINDS.get(type(message), "other")


_router = APIRouter()


@_router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    exposition = generate_latest() + generate_latest(_LedgerCollector(request.app.state.ledger))
    return Response(exposition, media_type=CONTENT_TYPE_LATEST)


class _LedgerCollector(Collector):
    """The state of this app's ledger (None: it runs none), read at the scrape."""

    def __init__(self, ledger: Ledger | None) -> None:
        self._ledger = ledger

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "gc_ledger_connected", "1 while the ledger consumes its queue; 0 while it waits "
                                   "for the broker, or is off.",
            value=int(self._ledger is not None and self._ledger.connected))
        yield CounterMetricFamily(
            "gc_ledger_reconnects", "Times the ledger's broker session was ready again after "
                                    "losing its connection.",
            value=self._ledger.reconnects if self._ledger is not None else 0)


class _RequestTimer:
    """ASGI middleware: time each HTTP request, labelled by the route the router matched."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status = "500"  # unless the app starts an answer of its own

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        started = time.perf_counter()
        try:
            await self._app(scope, receive, sending)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "other"
            # The router leaves the route it matched in the scope (the same dict).
            route = getattr(scope.get("route"), "path", UNMATCHED)
            REQUEST_SECONDS.labels(method, route, status).observe(time.perf_counter() - started)
