"""Call a registered gc-fabric function with nothing but an AMQP client (pika), JSON in and out.

This file is documentation for integrators writing a client in another language: it uses
no gc-fabric code, only the wire contract in ``docs/asyncapi.yaml``. The steps are:

1. declare our own result queue ``gc.results.{user}.{group}`` and bind it to ``gc.results``
   - before publishing, because results are published without ``mandatory`` and an unbound
   result is dropped;
2. publish one task to ``gc.tasks`` (routing key = endpoint id) with ``mandatory`` on a
   confirm-mode channel, so an unknown endpoint is reported instead of silently dropped;
3. wait for the first message on our queue whose ``message_id`` is our task id;
4. delete the queue.

A task the broker gives up on (dead-lettered after too many failed deliveries) arrives like
any other failure: the registry's ledger, the only consumer of ``gc.dead``, republishes it to
our queue as a ``failed`` result with error type ``TaskDeadLettered`` - while the ledger runs.

Usage::

    python examples/raw_amqp_client.py --endpoint EP_ID --function FN_ID 2 3 --kwargs '{"z": 1}'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import uuid
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

#: Broker used when neither --broker-url nor GC_BROKER_URL is given.
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
#: The version of the wire contract this client speaks (header gc-protocol).
PROTOCOL_VERSION = 1

# Names and arguments as in broker_config/topology.yaml (see docs/asyncapi.yaml).
TASKS_EXCHANGE = "gc.tasks"      # topic, routing key: endpoint id
RESULTS_EXCHANGE = "gc.results"  # topic, routing key: {user}.{task_group_id}
#: A result queue must be declared with exactly these arguments, or the broker refuses it
#: (PRECONDITION_FAILED) when another client declares the same queue differently.
RESULT_QUEUE_ARGUMENTS = {"x-queue-type": "quorum", "x-expires": 604_800_000}
#: Users and task group ids become routing-key words and queue-name parts.
_NAME_PART = re.compile(r"^[A-Za-z0-9_\-]+$")


class TaskNotAccepted(Exception):
    """The broker did not take the task: no queue for that endpoint, or a nack."""


def call(broker_url: str, endpoint_id: str, function_id: str, args: list[Any],
         kwargs: dict[str, Any] | None = None, user: str = "raw-service",
         timeout: float = 60.0) -> dict[str, Any]:
    """Run ``function_id(*args, **kwargs)`` on an endpoint and return its outcome.

    Returns ``{"task_id", "state": "success", "value"}``, or ``{"task_id", "state": "failed" |
    "cancelled", "error": {"type", "message", "traceback"}}`` (a dead-lettered task is
    ``failed`` with error type ``TaskDeadLettered``).

    Raises:
        ValueError: ``user`` is not one word of letters, digits, ``_`` and ``-``, or the
            message for our task is not a JSON gc-fabric result.
        TaskNotAccepted: the broker could not route the task to the endpoint's queue.
        TimeoutError: no outcome within ``timeout`` seconds.
    """
    if not _NAME_PART.match(user):
        raise ValueError(f"user {user!r} may contain only letters, digits, '_' and '-'")
    task_id, group = str(uuid.uuid4()), str(uuid.uuid4())
    params = pika.URLParameters(broker_url)
    params.client_properties = {"connection_name": f"raw-amqp-client:{user}"}
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        queue = _declare_result_queue(channel, user, group)
        try:
            _publish_task(channel, task_id, group, endpoint_id, function_id, user,
                          {"args": list(args), "kwargs": dict(kwargs or {})})
            return _wait_for_outcome(channel, queue, task_id, timeout)
        finally:
            if channel.is_open:
                channel.queue_delete(queue)
    finally:
        if connection.is_open:
            connection.close()


def _declare_result_queue(channel: BlockingChannel, user: str, group: str) -> str:
    """Declare and bind ``gc.results.{user}.{group}``; exchanges are declared idempotently."""
    channel.exchange_declare(TASKS_EXCHANGE, "topic", durable=True)
    channel.exchange_declare(RESULTS_EXCHANGE, "topic", durable=True)
    queue = f"gc.results.{user}.{group}"
    channel.queue_declare(queue, durable=True, arguments=RESULT_QUEUE_ARGUMENTS)
    # The only binding: dead-lettered tasks come here through the ledger, on this key too.
    channel.queue_bind(queue, RESULTS_EXCHANGE, routing_key=f"{user}.{group}")
    return queue


def _publish_task(channel: BlockingChannel, task_id: str, group: str, endpoint_id: str,
                  function_id: str, user: str, call_body: dict[str, Any]) -> None:
    """Publish one JSON task and wait for the broker's confirm."""
    properties = pika.BasicProperties(
        message_id=task_id,
        correlation_id=group,
        content_type="application/json",
        delivery_mode=2,
        headers={
            "gc-protocol": PROTOCOL_VERSION,  # an AMQP integer, not a string
            "gc-function-id": function_id,
            "gc-endpoint-id": endpoint_id,
            "gc-user": user,
            "gc-task-group": group,
            "gc-python": platform.python_version(),
            "gc-serializer": "json 1",
        },
    )
    try:
        # With confirms on, BlockingChannel returns once the broker acks, and raises if it
        # returned the message (mandatory: nothing bound for this key) or nacked it.
        channel.basic_publish(TASKS_EXCHANGE, endpoint_id, json.dumps(call_body).encode(),
                              properties, mandatory=True)
    except pika.exceptions.UnroutableError as exc:
        raise TaskNotAccepted(
            f"no task queue is bound for endpoint {endpoint_id!r} on exchange {TASKS_EXCHANGE} "
            "(wrong endpoint id, or the endpoint was never configured)") from exc
    except pika.exceptions.NackError as exc:
        raise TaskNotAccepted(f"the broker refused task {task_id} (basic.nack)") from exc


def _wait_for_outcome(channel: BlockingChannel, queue: str, task_id: str,
                      timeout: float) -> dict[str, Any]:
    """Consume ``queue`` until our task's first result arrives."""
    deadline = time.monotonic() + timeout
    try:
        for method, properties, body in channel.consume(queue, inactivity_timeout=0.5):
            if method is None:  # nothing arrived within inactivity_timeout
                if time.monotonic() > deadline:
                    break
                continue
            channel.basic_ack(method.delivery_tag)
            # Redelivery can produce duplicates: the first message for our task id wins.
            if properties.message_id == task_id:
                return {"task_id": task_id, **_outcome(properties, body)}
    finally:
        channel.cancel()
    raise TimeoutError(f"no result for task {task_id} within {timeout:.0f}s")


def _outcome(properties: pika.BasicProperties, body: bytes) -> dict[str, Any]:
    """Turn a result message into a plain dict."""
    state = (properties.headers or {}).get("gc-state")
    if state == "success":
        if properties.content_type != "application/json":
            raise ValueError(f"expected a JSON result, got {properties.content_type!r}")
        return {"state": "success", "value": json.loads(body)}
    if state not in ("failed", "cancelled"):
        raise ValueError(f"not a gc-fabric result (gc-state {state!r})")
    # failed (TaskDeadLettered too) or cancelled: the body is JSON {"type", "message", "traceback"}
    return {"state": state, "error": json.loads(body)}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker-url", default=os.environ.get("GC_BROKER_URL", DEFAULT_BROKER_URL))
    parser.add_argument("--endpoint", required=True, metavar="ENDPOINT_ID")
    parser.add_argument("--function", required=True, metavar="FUNCTION_ID")
    parser.add_argument("--user", default="raw-service")
    parser.add_argument("--kwargs", type=json.loads, default={}, help="a JSON object")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("args", nargs="*", type=json.loads, help="JSON values, e.g. 2 '\"text\"'")
    options = parser.parse_args(argv)
    try:
        outcome = call(options.broker_url, options.endpoint, options.function, options.args,
                       options.kwargs, options.user, options.timeout)
    except pika.exceptions.AMQPConnectionError as exc:
        print(f"error: cannot connect to the broker: {exc!r}", file=sys.stderr)
        return 1
    except (TaskNotAccepted, TimeoutError, ValueError, pika.exceptions.AMQPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if outcome["state"] == "success":
        print(json.dumps(outcome["value"]))
        return 0
    error = outcome["error"]
    print(f"task {outcome['task_id']} {outcome['state']}: {error['type']}: {error['message']}",
          file=sys.stderr)
    if error.get("traceback"):
        print(error["traceback"], end="", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
