"""Broker names and arguments from the packaged topology, placeholders filled in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gc_core.errors import ConfigError
from gc_core.topology import Binding, load_topology, safe_name_part


def test_load_topology_names_the_exchanges() -> None:
    topology = load_topology()

    assert topology.exchange("tasks") == "gc.tasks"
    assert topology.exchange("results") == "gc.results"
    assert topology.exchange("events") == "gc.events"
    assert topology.exchange("commands") == "gc.commands"
    assert topology.exchange("dead") == "gc.dead"


def test_exchanges_carry_their_types() -> None:
    exchanges = load_topology().exchanges

    assert exchanges["tasks"] == ("gc.tasks", "topic")
    assert exchanges["results"] == ("gc.results", "topic")
    assert exchanges["dead"] == ("gc.dead", "headers")


def test_the_endpoint_tasks_queue_is_a_quorum_queue_with_a_delivery_limit_and_dead_letters() -> None:
    queue = load_topology().queue("endpoint_tasks", endpoint_id="ep-7")

    assert queue.name == "gc.ep.ep-7.tasks"
    assert queue.arguments["x-queue-type"] == "quorum"
    assert queue.arguments["x-delivery-limit"] == 5
    assert queue.arguments["x-dead-letter-exchange"] == "gc.dead"
    assert queue.bindings == (Binding("gc.tasks", "ep-7", {}),)


def test_the_endpoint_commands_queue_is_bound_to_the_commands_exchange() -> None:
    queue = load_topology().queue("endpoint_commands", endpoint_id="ep-7")

    assert queue.name == "gc.ep.ep-7.commands"
    assert queue.bindings == (Binding("gc.commands", "ep-7", {}),)


def test_each_agent_hears_its_endpoints_commands_on_a_queue_that_goes_with_it() -> None:
    queue = load_topology().queue("agent_commands", endpoint_id="ep-7", agent_id="a1")

    assert queue.name == "gc.ep.ep-7.commands.a1"
    assert queue.bindings == (Binding("gc.commands", "ep-7", {}),)
    # transient and auto-delete: no replicas to keep per agent, nothing left when it dies
    assert (queue.durable, queue.auto_delete) == (False, True)
    assert queue.arguments == {"x-queue-type": "classic"}
    assert load_topology().queue("endpoint_commands", endpoint_id="ep-7").durable


def test_a_results_queue_binds_only_to_its_own_results() -> None:
    # Not to gc.dead: a headers binding escapes topic authorization (the ledger relays them).
    queue = load_topology().queue("results", user="alice", task_group_id="g-1")

    assert queue.name == "gc.results.alice.g-1"
    assert queue.arguments["x-queue-type"] == "quorum"
    assert isinstance(queue.arguments["x-expires"], int)
    assert queue.bindings == (Binding("gc.results", "alice.g-1", {}),)


def test_the_ledger_queue_sees_every_result_event_and_dead_letter() -> None:
    queue = load_topology().queue("ledger")

    assert queue.name == "gc.ledger"
    assert {(b.exchange, b.routing_key) for b in queue.bindings} == {
        ("gc.results", "#"), ("gc.events", "#"), ("gc.dead", "")}


def test_filling_one_queue_does_not_change_the_next() -> None:
    topology = load_topology()

    topology.queue("results", user="alice", task_group_id="g-1")
    second = topology.queue("results", user="bob", task_group_id="g-2")

    assert second.bindings[0].routing_key == "bob.g-2"


def test_patterns_match_one_name_part_per_open_placeholder_and_fixed_values_exactly() -> None:
    topology = load_topology()
    own = topology.queue_name_pattern("results", user="alice")
    heartbeat = topology.routing_key_pattern("heartbeat", endpoint_id="ep-1")

    assert own.match("gc.results.alice.g-1")
    assert not any(own.match(name) for name in (
        "gc.results.bob.g-1", "gc.results.alice.g.1", "gc.results.alice.#",
        "gc.results.alice.*", "gc.results.alice.g-1\n", "gc.results.alicex.g-1"))
    assert heartbeat.match("endpoint.ep-1.heartbeat")
    assert not heartbeat.match("endpoint.ep-2.heartbeat")
    assert topology.routing_key_pattern("result").match("bob.g-2")
    assert not topology.routing_key_pattern("result").match("bob.#")


@pytest.mark.parametrize(("kind", "values", "expected"), [
    ("task", {"endpoint_id": "ep-1"}, "ep-1"),
    ("result", {"user": "alice", "task_group_id": "g-1"}, "alice.g-1"),
    ("command", {"endpoint_id": "ep-1"}, "ep-1"),
    ("heartbeat", {"endpoint_id": "ep-1"}, "endpoint.ep-1.heartbeat"),
    ("group_submitted", {"task_group_id": "g-1"}, "group.g-1.submitted"),
])
def test_routing_key_fills_in_each_kind(kind: str, values: dict[str, str], expected: str) -> None:
    assert load_topology().routing_key(kind, **values) == expected


@pytest.mark.parametrize("value", ["alice", "ep-1", "A_b-9", "0b6f8a3e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"])
def test_safe_name_part_accepts_letters_digits_underscore_and_dash(value: str) -> None:
    assert safe_name_part(value, "user") == value


@pytest.mark.parametrize("value", ["alice.smith", "a#", "a*", "alice smith", "", "a/b", "alice\n", "g" * 65])
def test_safe_name_part_refuses_what_would_break_a_queue_name_or_routing_key(value: str) -> None:
    with pytest.raises(ConfigError, match="user"):
        safe_name_part(value, "user")


def test_load_topology_of_a_malformed_file_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text("exchanges: [this, is: not valid\n")

    with pytest.raises(ConfigError, match="cannot load broker topology"):
        load_topology(path)


def test_load_topology_of_a_file_of_the_wrong_shape_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text("exchanges:\n  tasks: {name: gc.tasks, type: fanciful}\nqueues: {}\n"
                    "routing_keys: {}\n")

    with pytest.raises(ConfigError, match=str(path)):
        load_topology(path)


def test_load_topology_of_a_missing_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_topology(tmp_path / "nowhere.yaml")


def test_load_topology_reads_a_given_file(tmp_path: Path) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text("exchanges:\n  tasks: {name: x.tasks, type: direct}\n"
                    "queues:\n  q: {name: 'x.{who}', bindings: [{exchange: tasks, routing_key: '{who}'}]}\n"
                    "routing_keys: {task: 'k.{who}'}\n")

    topology = load_topology(path)

    assert topology.exchange("tasks") == "x.tasks"
    assert topology.queue("q", who="me").name == "x.me"
    assert topology.queue("q", who="me").bindings == (Binding("x.tasks", "me", {}),)
    assert topology.routing_key("task", who="me") == "k.me"


def test_the_secured_nodes_definitions_hold_every_exchange_of_the_topology() -> None:
    # broker_config/definitions.json gives a secured node its exchanges at boot (nobody but
    # the registry may declare them there): it must not drift from topology.yaml.
    path = Path(__file__).resolve().parents[2] / "broker_config" / "definitions.json"
    definitions = json.loads(path.read_text())

    assert {(e["name"], e["type"]) for e in definitions["exchanges"]} == set(
        load_topology().exchanges.values())
    assert all(e["durable"] for e in definitions["exchanges"])


def test_the_quorum_group_size_the_topology_sets_goes_to_every_quorum_queue_only(
        tmp_path: Path) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text((Path(__file__).parents[2] / "broker_config" / "topology.yaml").read_text()
                    + "\nquorum_initial_group_size: 3\n")
    topology = load_topology(path)

    assert load_topology().queue("ledger").arguments == {"x-queue-type": "quorum"}
    for kind, values in [("endpoint_tasks", {"endpoint_id": "e"}), ("ledger", {}),
                         ("results", {"user": "u", "task_group_id": "g"})]:
        assert topology.queue(kind, **values).arguments["x-quorum-initial-group-size"] == 3
