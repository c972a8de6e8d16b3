"""The cluster fixture itself: three clustered nodes, quorum queues replicated on all of
them, and a quorum queue that loses no confirmed message when its leader is killed."""

from __future__ import annotations

import uuid

import pika

from gc_core.topology import load_topology
from tests.cluster.conftest import Cluster
from tests.fabric import eventually

#: Messages published (with confirms) before the leader is killed.
MESSAGES = 1000


def connect(url: str, name: str | None = None) -> pika.BlockingConnection:
    parameters = pika.URLParameters(url)
    if name is not None:
        parameters.client_properties = {"connection_name": name}
    return pika.BlockingConnection(parameters)


def test_three_nodes_form_one_cluster(cluster: Cluster) -> None:
    assert cluster.up() == [1, 2, 3]
    for k in (1, 2, 3):
        assert cluster.running_nodes(k) == [1, 2, 3]
    urls = cluster.urls()
    assert urls.split(",") == [cluster.url(k) for k in (1, 2, 3)]
    assert urls == ("amqp://guest:guest@127.0.0.1:5701/%2F,amqp://guest:guest@127.0.0.1:5702/%2F,"
                    "amqp://guest:guest@127.0.0.1:5703/%2F")


def test_node_of_connection_names_the_node_it_is_on(cluster: Cluster, cluster_vhost: str) -> None:
    name = f"probe-{uuid.uuid4().hex[:8]}"
    connection = connect(cluster.url(2, cluster_vhost), name)
    try:
        # The broker lists a connection a moment after it opens.
        assert eventually(lambda: cluster.node_of_connection(name, cluster_vhost), timeout=30,
                          what="the connection listed") == 2
        assert cluster.node_of_connection(name, "/") is None
    finally:
        connection.close()


def test_a_paused_node_is_brought_back(cluster: Cluster) -> None:
    cluster.pause(3)
    assert cluster.is_paused(3)
    assert cluster.up() == [1, 2]
    cluster.all_up()
    assert not cluster.is_paused(3)
    assert cluster.healthy()


def test_quorum_queue_survives_kill_of_its_leader(cluster: Cluster, cluster_vhost: str) -> None:
    queue = f"qq-{uuid.uuid4().hex[:8]}"
    sent = {f"message {i}".encode() for i in range(MESSAGES)}
    connection = connect(cluster.url(1, cluster_vhost))
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments={
            "x-queue-type": "quorum", "x-quorum-initial-group-size": 3})
        channel.confirm_delivery()
        for body in sorted(sent):
            # With confirms on, basic_publish returns once the broker has confirmed: the
            # message is on a majority of the queue's members.
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2),
                                  mandatory=True)
    finally:
        connection.close()
    assert cluster.members_of(queue, cluster_vhost) == [1, 2, 3]

    leader = eventually(lambda: cluster.leader_of(queue, cluster_vhost), timeout=30, what="a leader")
    cluster.kill(leader)

    def another_leader() -> int | None:
        now = cluster.leader_of(queue, cluster_vhost)
        return now if now != leader else None

    eventually(another_leader, timeout=30, what=f"a leader other than node {leader}")

    # Count by consuming: a passive declare on a follower right after the kill may say 0.
    survivor = next(k for k in (1, 2, 3) if k != leader)
    received: list[bytes] = []
    connection = connect(cluster.url(survivor, cluster_vhost))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=200)
        for method, _properties, body in channel.consume(queue, inactivity_timeout=30):
            if method is None:
                break
            received.append(body)
            channel.basic_ack(method.delivery_tag)
            if len(received) >= MESSAGES:
                break
        channel.cancel()
    finally:
        connection.close()
    assert len(received) == MESSAGES
    assert set(received) == sent


def test_endpoint_queues_declared_on_one_node_have_their_leaders_spread(
        cluster: Cluster, cluster_vhost: str) -> None:
    # cluster.conf's queue_leader_locator = balanced: not all on the declaring client's node.
    topology = load_topology()
    queues = [topology.queue("endpoint_tasks", endpoint_id=f"e{i}") for i in range(6)]
    connection = connect(cluster.url(1, cluster_vhost))
    try:
        channel = connection.channel()
        for queue in queues:
            channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
    finally:
        connection.close()

    leaders = [cluster.leader_of(queue.name, cluster_vhost) for queue in queues]

    assert set(leaders) == {1, 2, 3}, leaders
    assert all(cluster.members_of(queue.name, cluster_vhost) == [1, 2, 3] for queue in queues)
