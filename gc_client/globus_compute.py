"""Globus Compute's SDK, by its names and shapes, over gc-fabric: change the import line only.

    from globus_compute_sdk import Client, Executor, MPIFunction, ShellFunction
    from gc_client.globus_compute import Client, Executor, MPIFunction, ShellFunction

``Client`` answers in the SDK's dicts and lists where gc-fabric's own ``gc_client.Client``
answers in typed models; ``Executor`` takes the SDK's arguments. README.md ("Coming from
Globus Compute") lists each call, what it maps to and what differs.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from gc_client.client import Batch
from gc_client.client import Client as FabricClient
from gc_client.executor import ComputeFuture
from gc_client.executor import Executor as FabricExecutor
from gc_client.functions import MPIFunction as FabricMPIFunction
from gc_client.functions import ShellFunction as FabricShellFunction
from gc_client.functions import ShellResult
from gc_client.hardware import hardware_report
from gc_core.broker_login import broker_urls_on_port
from gc_core.errors import TaskExecutionFailed, TaskPending, VersionMismatch
from gc_core.registry_api.schemas import EndpointOut, EndpointStatus, FunctionOut
from gc_core.version import VERSION

__all__ = ["Batch", "Client", "Executor", "MPIFunction", "ShellFunction", "ShellResult",
           "TaskExecutionFailed", "TaskPending", "VersionMismatch"]

#: The SDK's login arguments: gc-fabric logs in with ``gc-client login`` or ``GC_TOKEN``.
LOGIN_ARGUMENTS = ("app", "authorizer", "login_manager", "environment")
#: What a hardware report is labelled with, as the SDK labels it.
HARDWARE_LABEL = "Compute Endpoint worker"


def release_line(release: str) -> str:
    """The versions that interoperate: the major version, or ``0.minor`` before 1.0.

    >>> release_line("2.3.1"), release_line("0.1.0")
    ('2', '0.1')
    """
    parts = release.split(".")
    return parts[0] if parts[0] != "0" else ".".join(parts[:2])


class Client:
    """Globus Compute's ``Client``: the same calls, answering in the SDK's dicts and lists.

    The fabric's own client is :attr:`fabric`; keyword arguments it takes (``broker_url``,
    ``registry_url``, ``token``, ``home``, ``user`` …) pass through to it.
    """

    def __init__(self, *, do_version_check: bool = True, fabric: FabricClient | None = None,
                 **arguments: Any) -> None:
        ignored = [name for name in LOGIN_ARGUMENTS if arguments.pop(name, None) is not None]
        if ignored:
            warnings.warn(f"{', '.join(ignored)} ignored: gc-fabric logs in with the token of "
                          "`gc-client login` or GC_TOKEN", stacklevel=2)
        #: gc-fabric's own client, which does the work.
        self.fabric = fabric or FabricClient(**arguments)
        if do_version_check:
            self.version_check()

    def version_check(self, endpoint_version: str | None = None) -> None:
        """Check that the registry answers and, given an endpoint's gc-fabric version, that
        it is of this client's release line (:func:`release_line`).

        Raises:
            RegistryError: the registry cannot be reached or refuses this client.
            VersionMismatch: ``endpoint_version`` is of another release line.
        """
        self.fabric.whoami()
        if endpoint_version is not None and release_line(endpoint_version) != release_line(VERSION):
            raise VersionMismatch("gc-fabric", local=VERSION, remote=endpoint_version,
                                  detail=f"client and endpoint must both run a "
                                         f"{release_line(VERSION)}.x release")

    # -- functions ------------------------------------------------------------------------

    def register_function(self, function: Callable[..., Any],
                          function_name: str | None = None) -> str:
        """Register ``function`` (once per process) and return its id."""
        return self.fabric.register_function(function, name=function_name)

    def delete_function(self, function_id: str) -> dict[str, Any]:
        """Forget a function you own; returns what it was."""
        return _function_dict(self.fabric.delete_function(function_id))

    # -- tasks ----------------------------------------------------------------------------

    def create_batch(self, task_group_id: str | uuid.UUID | None = None,
                     resource_specification: dict[str, Any] | None = None,
                     user_endpoint_config: dict[str, Any] | None = None,
                     create_websocket_queue: bool = False) -> Batch:
        """An empty batch; ``create_websocket_queue`` means nothing here (every task group
        has its result queue)."""
        return self.fabric.create_batch(
            task_group_id=str(task_group_id) if task_group_id else None,
            resource_specification=resource_specification,
            user_endpoint_config=user_endpoint_config)

    def batch_run(self, endpoint_id: str | uuid.UUID, batch: Batch) -> dict[str, Any]:
        """Submit the batch; the SDK's answer: task ids by function id, the task group and
        the endpoint, and a request id."""
        if not batch.calls:
            raise ValueError("no tasks in the batch: add calls with batch.add(function_id, "
                             "args, kwargs) first")
        task_ids = self.fabric.batch_run(str(endpoint_id), batch)
        tasks: dict[str, list[str]] = {}
        for (function_id, _, _), task_id in zip(batch.calls, task_ids):
            tasks.setdefault(function_id, []).append(task_id)
        return {"request_id": str(uuid.uuid4()), "task_group_id": batch.task_group_id,
                "endpoint_id": str(endpoint_id), "tasks": tasks}

    def run(self, *args: Any, endpoint_id: str | uuid.UUID, function_id: str,
            **kwargs: Any) -> str:
        """Submit one call; returns its task id."""
        return self.fabric.run(*args, endpoint_id=str(endpoint_id), function_id=function_id,
                               **kwargs)

    def get_task(self, task_id: str) -> dict[str, Any]:
        """``pending``, ``status`` and, once done, ``result`` and ``completion_t``.

        Raises:
            GCError: the task failed (the class its endpoint reported).
        """
        entry = self.get_batch_result([task_id])[task_id]
        if "exception" in entry:
            raise entry["exception"]
        return entry

    def get_result(self, task_id: str) -> Any:
        """The task's value; raises ``TaskPending`` until it is done, its error if it failed."""
        return self.fabric.get_result(task_id)

    def get_batch_result(self, task_id_list: list[str]) -> dict[str, dict[str, Any]]:
        """Per task id: ``pending``, ``status``, and ``result`` (with ``completion_t``) or
        ``exception``."""
        if not isinstance(task_id_list, list):
            raise TypeError("get_batch_result expects a list of task ids")
        answer = self.fabric.get_batch_result(task_id_list)
        finished = {task.task_id: task.timings.finished
                    for task in self.fabric.registry.get_tasks(
                        [task_id for task_id, entry in answer.items() if "result" in entry])}
        for task_id, entry in answer.items():
            if "result" in entry:
                entry["completion_t"] = str(finished.get(task_id) or "")
        return answer

    def get_worker_hardware_details(self, endpoint_id: str | uuid.UUID) -> str:
        """Start a hardware report on the endpoint; returns its task id (its result is text)."""
        function_id = self.fabric.register_function(hardware_report)
        return self.fabric.run(HARDWARE_LABEL, endpoint_id=str(endpoint_id),
                               function_id=function_id)

    # -- endpoints ------------------------------------------------------------------------

    def get_endpoints(self) -> list[dict[str, Any]]:
        """The endpoints you may see, each as the SDK lists them."""
        return [_endpoint_dict(endpoint) for endpoint in self.fabric.list_endpoints()]

    def get_endpoint_status(self, endpoint_id: str | uuid.UUID) -> dict[str, Any]:
        """``status`` (``online`` or ``offline``) and the latest heartbeat's ``details``, with
        the SDK's worker and task counts beside gc-fabric's own."""
        return _status_dict(self.fabric.get_endpoint_status(str(endpoint_id)))

    def get_endpoint_metadata(self, endpoint_id: str | uuid.UUID) -> dict[str, Any]:
        """The endpoint's registration and where its agent runs (host, engine, workers)."""
        endpoint = self.fabric.registry.get_endpoint(str(endpoint_id))
        status = self.fabric.get_endpoint_status(str(endpoint_id))
        details = status.details
        return {**_endpoint_dict(endpoint), "status": _status_dict(status)["status"],
                "hostname": details.get("hostname"), "engine": details.get("engine"),
                "workers": details.get("workers"), "started": details.get("started"),
                "endpoint_version": None, "sdk_version": VERSION}

    def delete_endpoint(self, endpoint_id: str | uuid.UUID) -> dict[str, Any]:
        """Forget an endpoint you own and revoke its agent tokens; returns what it was."""
        return _endpoint_dict(self.fabric.delete_endpoint(str(endpoint_id)))


class Executor(FabricExecutor):
    """Globus Compute's ``Executor``: its arguments, over gc-fabric's Executor.

    ``container_id`` must be None: an endpoint's config names its container
    (``container_type``, ``container_uri``), not the task. ``amqp_port`` reaches the broker
    on that port. ``api_burst_limit`` and ``api_burst_window_s`` pace the SDK's web-API
    calls, which gc-fabric does not make per task: they are accepted and have no effect.
    """

    def __init__(self, endpoint_id: str | uuid.UUID | None = None,
                 container_id: str | uuid.UUID | None = None,
                 client: Client | FabricClient | None = None,
                 task_group_id: str | uuid.UUID | None = None,
                 resource_specification: dict[str, Any] | None = None,
                 user_endpoint_config: dict[str, Any] | None = None,
                 label: str = "", batch_size: int = 128, amqp_port: int | None = None,
                 api_burst_limit: int = 4, api_burst_window_s: int = 16,
                 serializer: str | None = None, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"{', '.join(map(repr, kwargs))} is not an argument of Executor")
        if container_id is not None:
            raise ValueError("container_id is not supported: a gc-fabric endpoint runs every "
                             "task in the container its config names (container_type, "
                             "container_uri); submit to an endpoint configured with it")
        if serializer is not None and not isinstance(serializer, str):
            raise TypeError("serializer must be a serializer's name ('cloudpickle' or 'json'), "
                            f"not {type(serializer).__name__}")
        fabric = client.fabric if isinstance(client, Client) else client
        if amqp_port is not None:
            fabric = _on_port(fabric or FabricClient(), amqp_port)
        super().__init__(None if endpoint_id is None else str(endpoint_id), client=fabric,
                         task_group_id=None if task_group_id is None else str(task_group_id),
                         resource_specification=resource_specification,
                         user_endpoint_config=user_endpoint_config,
                         serializer=serializer or "cloudpickle", batch_size=batch_size)
        self.label = label
        self.amqp_port = amqp_port
        self.container_id = None
        self.api_burst_limit = api_burst_limit
        self.api_burst_window_s = api_burst_window_s

    @property
    def resource_specification(self) -> dict[str, Any] | None:
        """The resource specification of tasks submitted from now on; may be reassigned."""
        return self._group.resource_specification

    @resource_specification.setter
    def resource_specification(self, value: dict[str, Any] | None) -> None:
        self._group.resource_specification = _options_dict("resource_specification", value)

    @property
    def user_endpoint_config(self) -> dict[str, Any] | None:
        """The user endpoint config of tasks submitted from now on; may be reassigned."""
        return self._group.user_endpoint_config

    @user_endpoint_config.setter
    def user_endpoint_config(self, value: dict[str, Any] | None) -> None:
        self._group.user_endpoint_config = _options_dict("user_endpoint_config", value)

    def submit_to_registered_function(self, function_id: str,
                                      args: Iterable[Any] | None = None,
                                      kwargs: dict[str, Any] | None = None) -> ComputeFuture:
        """Run a registered function by id (``args`` may be None, as in the SDK)."""
        return super().submit_to_registered_function(function_id, args or (), kwargs)

    def register_function(self, fn: Callable[..., Any]) -> str:
        """Register ``fn`` ahead of its first submit; returns its id."""
        return self.client.register_function(fn)

    def get_worker_hardware_details(self) -> str:
        """A report of the hardware one of the endpoint's workers runs on."""
        report: str = self.submit(hardware_report, HARDWARE_LABEL).result()
        return report

    def reload_tasks(self, task_group_id: str | uuid.UUID | None = None) -> list[ComputeFuture]:
        """Futures for every task of this Executor's task group.

        Raises:
            ValueError: ``task_group_id`` names another group: build
                ``Executor(task_group_id=...)`` for that one.
        """
        if task_group_id is not None and str(task_group_id) != self.task_group_id:
            raise ValueError(f"this Executor's task group is {self.task_group_id}; to reload "
                             f"{task_group_id}, build Executor(task_group_id={str(task_group_id)!r})")
        return super().reload_tasks()


class ShellFunction(FabricShellFunction):
    """Globus Compute's ``ShellFunction(cmd, stdout, stderr, walltime, snippet_lines, name,
    return_dict)``; output comes back on the result, never into files on the endpoint."""

    def __init__(self, cmd: str, stdout: str | None = None, stderr: str | None = None,
                 walltime: float | None = None, snippet_lines: int = 1000,
                 name: str | None = None, return_dict: bool = False) -> None:
        _refuse_output_files(stdout, stderr)
        super().__init__(cmd, walltime=walltime, snippet_lines=snippet_lines, name=name)
        self.return_dict = return_dict

    def __call__(self, **kwargs: Any) -> Any:
        return _shaped(super().__call__(**kwargs), self.return_dict)


class MPIFunction(ShellFunction, FabricMPIFunction):
    """Globus Compute's ``MPIFunction``: ``ShellFunction``'s arguments; ranks from the
    Executor's ``resource_specification`` (its ``__call__`` is gc-fabric's MPIFunction's)."""


def _options_dict(name: str, value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict or None, not {type(value).__name__}")
    return value


def _refuse_output_files(stdout: str | None, stderr: str | None) -> None:
    if stdout is not None or stderr is not None:
        raise ValueError("stdout and stderr files are not supported: the command's output "
                         "comes back on the result (result.stdout, result.stderr)")


def _shaped(result: ShellResult, as_dict: bool) -> ShellResult | dict[str, Any]:
    """The result, or with ``return_dict`` the SDK's dict of it."""
    if not as_dict:
        return result
    return {"cmd": result.cmd, "returncode": result.returncode, "stdout": result.stdout,
            "stderr": result.stderr}


def _on_port(client: FabricClient, port: int) -> FabricClient:
    """A client like ``client`` whose broker connections go to ``port``."""
    settings = client.settings
    return FabricClient(broker_url=broker_urls_on_port(settings.broker_url, port),
                        registry_url=settings.registry_url, token=settings.token,
                        home=str(settings.home), user=settings.user,
                        identity=settings.identity or None, on_behalf_of=client.on_behalf_of,
                        max_message_size=client.max_message_size,
                        trusted_publishers=client.trusted_publishers)


def _endpoint_dict(endpoint: EndpointOut) -> dict[str, Any]:
    return {"uuid": endpoint.endpoint_id, "name": endpoint.name, "display_name": endpoint.name,
            "owner": endpoint.owner, "description": endpoint.description,
            "created": endpoint.created}


def _function_dict(function: FunctionOut) -> dict[str, Any]:
    return {"function_uuid": function.function_id, "function_name": function.name,
            "owner": function.owner, "created": function.created}


def _status_dict(status: EndpointStatus) -> dict[str, Any]:
    details = status.details
    workers, busy = details.get("workers"), details.get("workers_busy")
    counts = {"total_workers": workers, "outstanding_tasks": busy,
              "idle_workers": None if workers is None or busy is None else workers - busy,
              "pending_tasks": details.get("queue_depth")}
    return {"status": "online" if status.status == "online" else "offline",
            "details": {**details, **counts}}
