"""gc-client: register functions, run them, fetch results, list endpoints."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import click
from tqdm import tqdm

from gc_client.cli_identity import COMMANDS as IDENTITY_COMMANDS
from gc_client.client import Client
from gc_client.functions import MPIFunction, ShellFunction
from gc_core.cli import CommandLine, format_table, poll
from gc_core.errors import TaskPending
from gc_core.protocol import Timings
from gc_core.registry_api.listing import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

__all__ = ["main"]


@click.group(cls=CommandLine, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """Run Python functions on gc-fabric endpoints.

    \b
    Settings come from GC_BROKER_URL, GC_REGISTRY_URL, GC_TOKEN and GC_HOME
    (defaults match the local demo); `gc-client login` stores a token.
    \b
    Typical use:
      gc-client register analysis.py:fit      # prints a function id
      gc-client run --endpoint EP --function FN 3 '"text"' --wait
      gc-client result TASK_ID --wait

    \b
    An error is one line on stderr, and the exit status says which kind:
      1 the fabric's (registry, broker, config)  2 a task failed, or a usage error
      3 the task is still pending                130 interrupted (Ctrl-C)
    """
    ctx.obj = _Lazy()


class _Lazy:
    """Builds the Client on first use, so `--help` works without a registry."""

    _client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client()
        return self._client


@main.command()
@click.argument("target", metavar="FILE.py:FUNCTION")
@click.option("--name", default=None, help="Name to register under [default: the function's].")
@click.pass_obj
def register(lazy: _Lazy, target: str, name: str | None) -> None:
    """Register FUNCTION from FILE.py and print its function id."""
    function = _load_function(target)
    click.echo(lazy.client.register_function(function, name=name))


def _load_function(target: str) -> Callable[..., Any]:
    path_text, _, function_name = target.rpartition(":")
    path = Path(path_text)
    if not path_text or not function_name:
        raise click.BadParameter("expected FILE.py:FUNCTION, e.g. analysis.py:fit",
                                 param_hint="FILE.py:FUNCTION")
    if not path.is_file():
        raise click.BadParameter(f"no such file: {path}", param_hint="FILE.py:FUNCTION")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise click.BadParameter(f"{path} has no function {function_name!r}",
                                 param_hint="FILE.py:FUNCTION")
    return function  # type: ignore[no-any-return]


def _json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"{option} must be a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise click.BadParameter(f"{option} must be a JSON object, not a JSON "
                                 f"{type(value).__name__}")
    return value


def _parse_argument(text: str) -> Any:
    """A JSON literal if it is one (3, 2.5, true, "s", [1,2]), else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@main.command()
@click.option("--endpoint", "endpoint_id", required=True, help="Endpoint id to run on.")
@click.option("--function", "function_id", required=True, help="Registered function id.")
@click.option("--kwargs", "kwargs_json", default="{}", help='Keyword arguments as JSON, e.g. \'{"n": 3}\'.')
@click.option("--wait", is_flag=True, help="Wait for the result and print it instead of the task id.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds --wait waits.")
@click.option("--many", "many", type=click.File("r"), default=None, metavar="FILE",
              help="Run once per line of FILE ('-' for stdin): a JSON array of arguments or "
                   '{"args": [...], "kwargs": {...}}. Shows a progress bar and prints one JSON '
                   "result per line, in order.")
@click.argument("args", nargs=-1)
@click.pass_obj
def run(lazy: _Lazy, endpoint_id: str, function_id: str, kwargs_json: str, wait: bool,
        timeout: float, many: TextIO | None, args: tuple[str, ...]) -> None:
    """Run a registered function with ARGS (each a JSON literal or a plain string).

    Arguments and the result travel as JSON, so any language can read them.
    """
    kwargs = _json_object(kwargs_json, "--kwargs")
    if many is not None:
        calls = [_parse_call(line, number) for number, line in enumerate(many, 1) if line.strip()]
        _run_many(lazy.client, endpoint_id, function_id, calls, timeout)
        return
    task_id = lazy.client.run(*[_parse_argument(a) for a in args], endpoint_id=endpoint_id,
                              function_id=function_id, serializer="json", **kwargs)
    if wait:
        _print_value(_wait_for_result(lazy.client, task_id, timeout, "json"))
    else:
        click.echo(task_id)


@main.command()
@click.option("--endpoint", "endpoint_id", required=True, help="Endpoint id to run on.")
@click.argument("command")
@click.option("--kwargs", "kwargs_json", default="{}",
              help='Values for the {placeholders} in COMMAND, as JSON, e.g. \'{"n": 3}\'.')
@click.option("--walltime", type=float, default=None, help="Seconds before the command is killed.")
@click.option("--mpi-ranks", type=click.IntRange(1), default=None,
              help="Run under the endpoint's MPI launcher (mpiexec) with this many ranks.")
@click.option("--wait", is_flag=True, help="Wait and print the return code and output.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds --wait waits.")
@click.pass_obj
def shell(lazy: _Lazy, endpoint_id: str, command: str, kwargs_json: str, walltime: float | None,
          mpi_ranks: int | None, wait: bool, timeout: float) -> None:
    """Run a shell COMMAND on an endpoint ({name} placeholders filled from --kwargs)."""
    kwargs = _json_object(kwargs_json, "--kwargs")
    function: ShellFunction = (MPIFunction(command, walltime=walltime) if mpi_ranks
                               else ShellFunction(command, walltime=walltime))
    batch = lazy.client.create_batch(
        resource_specification={"num_ranks": mpi_ranks} if mpi_ranks else None)
    batch.add(lazy.client.register_function(function), kwargs=kwargs)
    task_id = lazy.client.batch_run(endpoint_id, batch)[0]
    if not wait:
        click.echo(task_id)
        return
    outcome = _wait_for_result(lazy.client, task_id, timeout, "cloudpickle")
    click.echo(outcome.stdout, nl=False)
    click.echo(outcome.stderr, nl=False, err=True)
    sys.exit(outcome.returncode)


@main.command()
@click.argument("task_id")
@click.option("--wait", is_flag=True, help="Wait until the task finishes.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds --wait waits.")
@click.option("--output", "show_output", is_flag=True,
              help="Also print what the task wrote to stdout and stderr.")
@click.option("--serializer", type=click.Choice(["json", "cloudpickle"]), default=None,
              help="The serializer the task was sent with: its value is decoded with this one "
                   "only (a pickled value can run code). [default: whatever the ledger recorded]")
@click.pass_obj
def result(lazy: _Lazy, task_id: str, wait: bool, timeout: float, show_output: bool,
           serializer: str | None) -> None:
    """Print the result of TASK_ID (exit status 3 while it is pending, 2 if it failed or
    the ledger has no such task)."""
    try:
        value = (_wait_for_result(lazy.client, task_id, timeout, serializer) if wait
                 else lazy.client.get_result(task_id, serializer=serializer))
    finally:
        if show_output:
            _print_output(lazy.client, task_id)
    _print_value(value)


def _print_output(client: Client, task_id: str) -> None:
    task = client.get_task(task_id)
    for name, text in (("stdout", task.stdout), ("stderr", task.stderr)):
        click.echo(f"--- {name} of task {task_id} ---", err=True)
        click.echo(text.rstrip("\n") if text else "(nothing)", err=True)


def _parse_call(line: str, number: int) -> tuple[list[Any], dict[str, Any]]:
    try:
        call = json.loads(line)
    except ValueError as exc:
        raise click.BadParameter(f"line {number} of --many is not JSON: {exc}") from exc
    if isinstance(call, list):
        return call, {}
    if isinstance(call, dict) and isinstance(call.get("args", []), list) \
            and isinstance(call.get("kwargs", {}), dict):
        return list(call.get("args", [])), dict(call.get("kwargs", {}))
    raise click.BadParameter(f'line {number} of --many must be a JSON array or '
                             '{"args": [...], "kwargs": {...}}')


def _run_many(client: Client, endpoint_id: str, function_id: str,
              calls: list[tuple[list[Any], dict[str, Any]]], timeout: float) -> None:
    batch = client.create_batch(serializer="json")
    for call_args, call_kwargs in calls:
        batch.add(function_id, call_args, call_kwargs)
    task_ids = client.batch_run(endpoint_id, batch)
    with tqdm(total=len(task_ids), desc="tasks", unit="task", file=sys.stderr) as bar:
        results = _wait_for_results(client, task_ids, timeout, "json", on_finished=bar.update)
    failed = 0
    for task_id in task_ids:
        entry = results[task_id]
        if "exception" in entry:
            failed += 1
            click.echo(json.dumps({"task_id": task_id, "error": str(entry["exception"])}))
        else:
            click.echo(json.dumps(entry["result"]))
    if failed:
        click.echo(f"{failed} of {len(task_ids)} tasks failed", err=True)
        sys.exit(2)


def _wait_for_result(client: Client, task_id: str, timeout: float,
                     serializer: str | None) -> Any:
    """The task's value once it has one (its error, if it failed).

    Raises:
        TaskPending: still no result after ``timeout`` seconds.
    """
    entry = _wait_for_results(client, [task_id], timeout, serializer)[task_id]
    if "exception" in entry:
        raise entry["exception"]
    return entry["result"]


def _wait_for_results(client: Client, task_ids: Sequence[str], timeout: float,
                      serializer: str | None, *,
                      on_finished: Callable[[int], object] | None = None) -> dict[str, dict[str, Any]]:
    """Each task's entry from :meth:`Client.get_batch_result` once none is pending; the
    ledger is asked about the unfinished ones only, and ``on_finished`` told how many
    finished since it last asked.

    Raises:
        TaskPending: the first task still unfinished after ``timeout`` seconds.
    """
    results: dict[str, dict[str, Any]] = {}

    def all_finished() -> bool:
        waiting = [t for t in task_ids if t not in results]
        answers = client.get_batch_result(waiting, serializer=serializer)
        finished = {t: entry for t, entry in answers.items() if not entry["pending"]}
        results.update(finished)
        if on_finished is not None:
            on_finished(len(finished))
        return len(results) == len(task_ids)

    if not poll(all_finished, timeout=timeout):
        first = next(t for t in task_ids if t not in results)
        raise TaskPending(first, "waiting")
    return results


def _print_value(value: Any) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        click.echo(json.dumps(value))
    except (TypeError, ValueError):
        click.echo(repr(value))


@main.command()
@click.argument("task_ids", nargs=-1, required=True, metavar="TASK_ID...")
@click.option("--endpoint", "endpoint_id", default=None,
              help="Endpoint the tasks were sent to [default: looked up in the ledger].")
@click.pass_obj
def cancel(lazy: _Lazy, task_ids: tuple[str, ...], endpoint_id: str | None) -> None:
    """Cancel tasks: a queued task never runs, a running one has its worker stopped."""
    sent = lazy.client.cancel(list(task_ids), endpoint_id=endpoint_id)
    for task_id in task_ids:
        click.echo(f"{task_id}: cancel sent" if task_id in sent
                   else f"{task_id}: not in the ledger (give --endpoint to cancel anyway)")
    if len(sent) < len(task_ids):
        sys.exit(1)


@main.command()
@click.option("--endpoint", "endpoint_id", default=None, help="Only this endpoint.")
@click.pass_obj
def status(lazy: _Lazy, endpoint_id: str | None) -> None:
    """Per endpoint: online or not, tasks queued and running, done, failed and cancelled."""
    client = lazy.client
    ids = [endpoint_id] if endpoint_id else [e.endpoint_id for e in client.list_endpoints()]
    rows = []
    for endpoint in ids:
        health = client.get_endpoint_status(endpoint)
        counts = client.registry.get_task_counts(endpoint)
        online = health.status == "online"
        running = health.details.get("workers_busy") if online else 0
        agents = len(health.details.get("agents") or [health.details]) if online else 0
        rows.append([endpoint, health.status, agents, health.details.get("queue_depth"), running,
                     counts["waiting"], counts["success"], counts["failed"], counts["cancelled"]])
    click.echo(format_table(["ENDPOINT ID", "STATUS", "AGENTS", "QUEUED", "RUNNING", "WAITING",
                             "DONE", "FAILED", "CANCELLED"], rows))
    click.echo("AGENTS, QUEUED and RUNNING come from the agents' last heartbeats (RUNNING "
               "summed over them); WAITING counts submitted tasks without a result yet.")


@main.command()
@click.option("--group", "task_group_id", default=None,
              help="Only this task group (Executor.task_group_id); alone, it lists the whole "
                   "group with a count by state.")
@click.option("--state", type=click.Choice(["waiting", "success", "failed", "cancelled"]),
              default=None, help="Only tasks in this state.")
@click.option("--endpoint", "endpoint_id", default=None, help="Only tasks sent to this endpoint.")
@click.option("--limit", type=click.IntRange(1, MAX_PAGE_SIZE), default=DEFAULT_PAGE_SIZE,
              show_default=True, help="Tasks per page.")
@click.option("--cursor", default=None, help="Where the page before ended (each page prints "
                                               "the command for the next).")
@click.pass_obj
def tasks(lazy: _Lazy, task_group_id: str | None, state: str | None, endpoint_id: str | None,
          limit: int, cursor: str | None) -> None:
    """List your tasks, newest first, a page at a time (or a whole task group's)."""
    if task_group_id is not None and not (state or endpoint_id or cursor):
        _print_group(lazy.client, task_group_id)
        return
    page = lazy.client.registry.list_tasks(state=state, endpoint_id=endpoint_id,
                                           task_group_id=task_group_id, cursor=cursor,
                                           limit=limit)
    if not page.tasks:
        click.echo("No tasks to list." if cursor is None else "No more tasks.")
        return
    click.echo(format_table(
        ["TASK ID", "STATUS", "SUBMITTED (UTC)", "SECONDS", "ENDPOINT ID", "TASK GROUP ID"],
        [[task.task_id, task.status, _utc(task.submitted), _run_seconds(task.timings),
          task.endpoint_id, task.task_group_id] for task in page.tasks]))
    if page.next_cursor:
        given = [("--group", task_group_id), ("--state", state), ("--endpoint", endpoint_id)]
        options = "".join(f" {flag} {value}" for flag, value in given if value)
        click.echo(f"More: gc-client tasks{options} --limit {limit} --cursor {page.next_cursor}")


@main.command()
@click.option("--limit", type=click.IntRange(1, MAX_PAGE_SIZE), default=DEFAULT_PAGE_SIZE,
              show_default=True, help="Functions per page.")
@click.option("--cursor", default=None, help="Where the page before ended.")
@click.pass_obj
def functions(lazy: _Lazy, limit: int, cursor: str | None) -> None:
    """List the functions you may run (yours, your groups', public ones), newest first."""
    page = lazy.client.registry.list_functions(cursor=cursor, limit=limit)
    if not page.functions:
        click.echo("No functions to list; register one with `gc-client register FILE.py:FUNCTION`."
                   if cursor is None else "No more functions.")
        return
    click.echo(format_table(
        ["FUNCTION ID", "NAME", "OWNER", "SHARING", "REGISTERED (UTC)"],
        [[f.function_id, f.name, f.owner, f.sharing.sharing, _utc(f.created)]
         for f in page.functions]))
    if page.next_cursor:
        click.echo(f"More: gc-client functions --limit {limit} --cursor {page.next_cursor}")


def _utc(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _run_seconds(timings: Timings) -> float | None:
    if timings.finished is None or timings.started is None:
        return None
    return timings.finished - timings.started


def _print_group(client: Client, task_group_id: str) -> None:
    """Every task of a group with its state, pending ones included, and a count by state."""
    listed = client.registry.list_group_tasks(task_group_id)
    if not listed:
        click.echo(f"The ledger knows no tasks in group {task_group_id}.")
        return
    rows = [[task.task_id, task.status, _run_seconds(task.timings), task.worker or None]
            for task in listed]
    click.echo(format_table(["TASK ID", "STATUS", "SECONDS", "WORKER"], rows))
    by_status: dict[str, int] = {}
    for task in listed:
        by_status[task.status] = by_status.get(task.status, 0) + 1
    click.echo(", ".join(f"{n} {s}" for s, n in sorted(by_status.items())))


@main.command()
@click.pass_obj
def endpoints(lazy: _Lazy) -> None:
    """List the endpoints you may see: status, last heartbeat, queue and workers."""
    listed = lazy.client.list_endpoints()
    if not listed:
        click.echo("No endpoints you can see; an admin runs `gc-agent configure NAME`, and "
                   "an owner shares one with `gc-client policy set ID --allow-user YOU`.")
        return
    now = time.time()
    rows = []
    for endpoint in listed:
        health = lazy.client.get_endpoint_status(endpoint.endpoint_id)
        details = health.details
        workers, busy = details.get("workers"), details.get("workers_busy")
        idle = workers - busy if isinstance(workers, int) and isinstance(busy, int) else None
        seen = None if health.last_seen is None else f"{max(0, now - health.last_seen):.0f}s ago"
        rows.append([endpoint.endpoint_id, health.status, seen, details.get("queue_depth"), busy,
                     idle, endpoint.name])
    click.echo(format_table(["ENDPOINT ID", "STATUS", "LAST SEEN", "QUEUED", "BUSY", "IDLE",
                             "NAME"], rows))


for _command in IDENTITY_COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":
    main()
