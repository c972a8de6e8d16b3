"""Prometheus metrics of a real fabric: each agent's /metrics and the registry's.

One stack for the module: the session's registry, an endpoint on the processes engine and
one on htex (a local block), each agent serving /metrics on a port of its own. They run a
few tasks (successes, a failure, a refusal); the tests scrape both sides and read what
they serve with prometheus_client's own parser, then check the shipped Grafana dashboard
asks only for metrics that are there.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gc_agent.config import EndpointConfig, HtexEngineConfig, load_config, save_config
from gc_agent.providers import LocalProviderConfig
from gc_client import Client, Executor, TaskExecutionFailed
from gc_core.errors import SerializerNotAllowed
from tests.fabric import Endpoint, Fabric, eventually, free_port, rabbitmqctl
from tests.faults.test_agent_faults import _connections_named

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "gc-fabric.json"
#: Tasks each endpoint runs to success; the processes endpoint also runs one that fails.
SUCCEEDING = 6
#: Seconds a test waits for a result (the htex block's worker pool comes up first).
RESULT_TIMEOUT = 90
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: PromQL words that are not metric names.
PROMQL_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right",
                          "bool", "and", "or", "unless", "offset", "inf", "nan"})


def square(x: int) -> int:
    return x * x


def divide(a: float, b: float) -> float:
    return a / b


@dataclass(frozen=True)
class Scrape:
    """One /metrics answer, parsed."""

    samples: list[Sample]
    text: str

    @classmethod
    def of(cls, url: str) -> Scrape:
        text = httpx.get(url, timeout=10).raise_for_status().text
        return cls([sample for family in text_string_to_metric_families(text)
                    for sample in family.samples], text)

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` that carry ``labels``."""
        return sum(sample.value for sample in self.samples if sample.name == name
                   and all(sample.labels.get(key) == want for key, want in labels.items()))

    @property
    def names(self) -> set[str]:
        return {sample.name for sample in self.samples}


@dataclass(frozen=True)
class Run:
    """What the module's tasks were, and the registry's metrics from before them."""

    task_ids: list[str]
    group_ids: list[str]
    registry_before: Scrape


def settled(url: str, endpoint: str,
            also: Callable[[Scrape], bool] = lambda _scrape: True) -> Scrape:
    """The agent's metrics once no task is in flight (and ``also`` holds): a result may
    reach its client before the agent hears the broker confirm it, and counts it."""
    scrape: Scrape = eventually(lambda: (s := Scrape.of(url)).value(
        "gc_tasks_in_flight", endpoint=endpoint) == 0 and also(s) and s,
        what=f"the agent at {url} to settle")
    return scrape


def metrics_url(endpoint: Endpoint) -> str:
    port = load_config(endpoint.directory / "config.yaml").metrics_port
    return f"http://127.0.0.1:{port}/metrics"


@pytest.fixture(scope="module")
def processes_endpoint(fabric: Fabric) -> Iterator[Endpoint]:
    """Two process workers, metrics on; JSON tasks refused (cloudpickle only)."""
    endpoint = fabric.configure_endpoint(
        f"metered-{uuid.uuid4().hex[:8]}", heartbeat_period=1.0, metrics_port=free_port(),
        allowed_serializers=frozenset({"cloudpickle"}))
    endpoint.start()
    yield endpoint
    endpoint.stop_all()


@pytest.fixture(scope="module")
def htex_endpoint(fabric: Fabric) -> Iterator[Endpoint]:
    """One local htex block of one worker, metrics on."""
    pytest.importorskip("parsl", reason="the htex engine needs Parsl")
    endpoint = fabric.configure_endpoint(f"metered-htex-{uuid.uuid4().hex[:8]}",
                                         heartbeat_period=1.0, metrics_port=free_port())
    engine = HtexEngineConfig(type="htex", max_workers_per_node=1, provider=LocalProviderConfig(
        init_blocks=1, min_blocks=1, max_blocks=1, worker_init=f"export PYTHONPATH={REPO_ROOT}"))
    path = endpoint.directory / "config.yaml"
    save_config(load_config(path).model_copy(update={"engine": engine}), path)
    endpoint.start()
    yield endpoint
    endpoint.stop_all()


@pytest.fixture(scope="module")
def run(fabric: Fabric, htex_endpoint: Endpoint, processes_endpoint: Endpoint) -> Run:
    """Successes on both endpoints, a failure and a refusal on the processes one, and
    look-ups of each task group in the registry (a path with a group id in it)."""
    before = Scrape.of(f"{fabric.registry_url}/metrics")
    with Client(broker_url=fabric.broker_url, registry_url=fabric.registry_url,
                home=str(fabric.home)) as client:
        # htex first (its fixture too): its worker pool comes up while the other engine works
        with Executor(endpoint_id=htex_endpoint.endpoint_id, client=client) as on_htex, \
                Executor(endpoint_id=processes_endpoint.endpoint_id, client=client) as on_processes:
            futures = [executor.submit(square, x) for executor in (on_htex, on_processes)
                       for x in range(SUCCEEDING)]
            failing = on_processes.submit(divide, 1, 0)
            with pytest.raises(TaskExecutionFailed):
                failing.result(timeout=RESULT_TIMEOUT)
            assert [future.result(timeout=RESULT_TIMEOUT) for future in futures] == \
                   [x * x for x in range(SUCCEEDING)] * 2
        with Executor(endpoint_id=processes_endpoint.endpoint_id, client=client,
                      serializer="json") as on_json:
            refused = on_json.submit(square, 3)
            with pytest.raises(SerializerNotAllowed):
                refused.result(timeout=RESULT_TIMEOUT)
        task_ids = [future.task_id for future in [*futures, failing, refused]]
        group_ids = [executor.task_group_id for executor in (on_htex, on_processes, on_json)]
        eventually(lambda: all(task.status != "waiting" for group in group_ids
                               for task in client.registry.list_group_tasks(group)),
                   what="the ledger to record every task")
    return Run(task_ids, group_ids, before)


def test_the_agent_counts_its_tasks_by_state_and_times_them(
        run: Run, processes_endpoint: Endpoint) -> None:
    endpoint = processes_endpoint.endpoint_id
    scrape = settled(metrics_url(processes_endpoint), endpoint)

    assert scrape.value("gc_tasks_received_total", endpoint=endpoint) == SUCCEEDING + 2
    assert scrape.value("gc_tasks_total", endpoint=endpoint, state="success") == SUCCEEDING
    # the division by zero, and the refused JSON task (answered with an error result)
    assert scrape.value("gc_tasks_total", endpoint=endpoint, state="failed") == 2
    assert scrape.value("gc_task_refusals_total", endpoint=endpoint,
                        reason="SerializerNotAllowed") == 1
    # only the tasks that ran are timed: not the refused one
    assert scrape.value("gc_task_run_seconds_count", endpoint=endpoint) == SUCCEEDING + 1
    assert scrape.value("gc_task_queue_wait_seconds_count", endpoint=endpoint) == SUCCEEDING + 1
    assert scrape.value("gc_task_run_seconds_sum", endpoint=endpoint) > 0
    assert scrape.value("gc_tasks_in_flight", endpoint=endpoint) == 0
    assert scrape.value("gc_workers", endpoint=endpoint, state="idle") == 2
    assert scrape.value("gc_workers", endpoint=endpoint, state="busy") == 0
    assert scrape.value("gc_broker_connected", endpoint=endpoint) == 1
    assert scrape.value("gc_agent_info", endpoint=endpoint, engine="processes") == 1
    assert "process_resident_memory_bytes" in scrape.names


def test_the_htex_agent_shows_its_blocks_and_workers_by_state(
        run: Run, htex_endpoint: Endpoint) -> None:
    endpoint = htex_endpoint.endpoint_id
    url = metrics_url(htex_endpoint)

    # The engine's view comes with its next scaling pass after the tasks ran.
    scrape = settled(url, endpoint, lambda s: s.value("gc_workers", endpoint=endpoint,
                                                       state="idle") == 1)
    assert scrape.value("gc_htex_blocks", endpoint=endpoint, state="running") == 1
    assert scrape.value("gc_htex_blocks", endpoint=endpoint, state="pending") == 0
    assert scrape.value("gc_tasks_total", endpoint=endpoint, state="success") == SUCCEEDING
    assert scrape.value("gc_task_run_seconds_count", endpoint=endpoint) == SUCCEEDING


def test_the_registry_times_requests_by_route_template_and_counts_ledger_commits(
        run: Run, fabric: Fabric) -> None:
    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - run.registry_before.value(name, **labels)

    # The ledger counts a commit just after making it, when the tasks show as done.
    after: Scrape = eventually(lambda: (s := Scrape.of(f"{fabric.registry_url}/metrics")).value(
        "gc_ledger_messages_total", kind="result") - run.registry_before.value(
        "gc_ledger_messages_total", kind="result") >= len(run.task_ids) and s,
        what="the ledger's commits counted")

    assert moved("gc_registry_request_duration_seconds_count", method="GET",
                 route="/task-groups/{task_group_id}/tasks", status="200") >= len(run.group_ids)
    # every result went through the ledger, each with its lag, in some commits
    assert moved("gc_ledger_messages_total", kind="result") >= len(run.task_ids)
    assert moved("gc_ledger_lag_seconds_count") >= len(run.task_ids)
    assert 1 <= moved("gc_ledger_commit_batch_size_count") <= moved(
        "gc_ledger_commit_batch_size_sum")
    assert after.value("gc_ledger_connected") == 1


def test_a_path_or_method_no_route_knows_is_labelled_by_one_word(fabric: Fabric) -> None:
    unknown_path = f"/no-such-route/{uuid.uuid4()}"
    before = Scrape.of(f"{fabric.registry_url}/metrics")

    assert httpx.get(fabric.registry_url + unknown_path).status_code == 404
    assert httpx.request("BREW", f"{fabric.registry_url}/health").status_code == 405

    after = Scrape.of(f"{fabric.registry_url}/metrics")
    assert unknown_path not in after.text
    for labels in ({"method": "GET", "route": "unmatched", "status": "404"},
                   {"method": "other", "route": "/health", "status": "405"}):
        assert after.value("gc_registry_request_duration_seconds_count", **labels) == \
               before.value("gc_registry_request_duration_seconds_count", **labels) + 1


def test_no_label_value_is_a_task_or_group_id(run: Run, fabric: Fabric,
                                              processes_endpoint: Endpoint,
                                              htex_endpoint: Endpoint) -> None:
    scrapes = [Scrape.of(url) for url in (f"{fabric.registry_url}/metrics",
                                          metrics_url(processes_endpoint),
                                          metrics_url(htex_endpoint))]
    ids = set(run.task_ids) | set(run.group_ids)

    for scrape in scrapes:
        assert not [task_id for task_id in ids if task_id in scrape.text]
        # the one id a label may hold is an endpoint's (function ids, user names: none)
        assert not [(sample.name, key, value) for sample in scrape.samples
                    for key, value in sample.labels.items()
                    if UUID.search(value) and key != "endpoint"]
    routes = {sample.labels["route"] for sample in scrapes[0].samples if "route" in sample.labels}
    assert "/task-groups/{task_group_id}/tasks" in routes


def test_agent_and_ledger_count_a_reconnect_after_the_broker_closes_their_connections(
        run: Run, fabric: Fabric, processes_endpoint: Endpoint, vhost: str) -> None:
    endpoint, agent_url = processes_endpoint.endpoint_id, metrics_url(processes_endpoint)
    registry_url = f"{fabric.registry_url}/metrics"

    def sessions() -> tuple[float, ...]:
        """Reconnects of the agent and of the ledger, then whether each is connected."""
        agent, registry = Scrape.of(agent_url), Scrape.of(registry_url)
        return (agent.value("gc_broker_reconnects_total", endpoint=endpoint),
                registry.value("gc_ledger_reconnects_total"),
                agent.value("gc_broker_connected", endpoint=endpoint),
                registry.value("gc_ledger_connected"))

    agent_before, ledger_before, *_connected = sessions()
    connections = [*_connections_named(f"gc-agent:{endpoint}", vhost),
                   *_connections_named("gc-registry:ledger", vhost)]
    assert len(connections) == 2
    for pid in connections:
        rabbitmqctl("close_connection", pid, "test: forced close")

    eventually(lambda: sessions() == (agent_before + 1, ledger_before + 1, 1, 1),
               what="both reconnected, and each reconnect counted once")


def test_an_agent_whose_metrics_port_is_taken_says_so_and_does_not_start(
        fabric: Fabric, processes_endpoint: Endpoint) -> None:
    # Given a second endpoint config naming the port the running agent serves metrics on
    config = load_config(processes_endpoint.directory / "config.yaml")
    name = f"clash-{uuid.uuid4().hex[:8]}"
    save_config(config.model_copy(update={"name": name}),
                fabric.home / "endpoints" / name / "config.yaml")
    taken = config.metrics_port

    ran = subprocess.run([sys.executable, "-m", "gc_agent.cli", "start", name],
                         env=fabric.env, capture_output=True, text=True, timeout=60)

    assert ran.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{taken}" in ran.stderr
    assert "metrics_port" in ran.stderr


def test_the_service_example_config_serves_metrics_and_the_default_serves_none() -> None:
    example = load_config(REPO_ROOT / "deploy" / "systemd" / "config.example.yaml")

    assert example.metrics_port is not None
    assert example.metrics_address == "127.0.0.1"
    assert EndpointConfig(name="demo", endpoint_id="x").metrics_port is None


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label
    matchers, ranges, grouping clauses, function calls and numbers are taken out."""
    expr = re.sub(r"label_values\(\s*([\w:]+)[^)]*\)", r"\1", expr)  # a variable's query
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = re.findall(r"(?<![\w.$])([A-Za-z_:][\w:]*)\b(?!\s*\()", expr)
    return {name for name in names if name.lower() not in PROMQL_WORDS}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"]
               for target in panel.get("targets", [])]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"]
                if variable["type"] == "query"]
    return queries


def test_promql_metric_names_are_read_as_prometheus_would() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le, route) (rate(gc_x_bucket{route=~"$r"}[5m])))'
        ' / clamp_min(sum(gc_y_total), 1e-9) + label_values(gc_agent_info, endpoint)') == \
        {"gc_x_bucket", "gc_y_total", "gc_agent_info"}


def test_every_dashboard_query_names_metrics_a_real_agent_or_registry_serves(
        run: Run, fabric: Fabric, processes_endpoint: Endpoint,
        htex_endpoint: Endpoint) -> None:
    served: set[str] = set()
    for url in (f"{fabric.registry_url}/metrics", metrics_url(processes_endpoint),
                metrics_url(htex_endpoint)):
        served |= Scrape.of(url).names
    queries = dashboard_queries()
    named = {query: promql_metric_names(query) for query in queries}

    assert len(queries) > 20
    assert not [query for query, names in named.items() if not names]
    missing = {query: names - served for query, names in named.items()}
    assert not {query: names for query, names in missing.items() if names}
    # and the dashboard shows every gc_ metric served
    used = set().union(*named.values())
    families = {re.sub(r"_(bucket|sum|count|total|info|created)$", "", name) for name in served
                if name.startswith("gc_")}
    assert not [family for family in families
                if not any(name.startswith(family) for name in used)]
