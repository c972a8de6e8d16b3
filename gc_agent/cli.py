"""gc-agent: configure, start, stop and list this machine's endpoints."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from gc_agent.agent import Agent
from gc_agent.config import EndpointConfig, EngineConfig, load_config, save_config
from gc_agent.daemon import EndpointFiles, spawn_detached, stop_process
from gc_core.broker import BrokerSession
from gc_core.errors import GCError
from gc_core.logs import configure_logging
from gc_core.registry.client import RegistryClient
from gc_core.settings import FabricSettings, resolve_settings
from gc_core.topology import load_topology

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="GC_HOME", default=None, metavar="DIR",
              help="Where endpoints keep their files [default: $GC_HOME or ~/.gc].")
@click.pass_context
def main(ctx: click.Context, home: str | None) -> None:
    """Run gc-fabric endpoints on this machine.

    \b
    Typical use:
      gc-agent configure my-laptop      # registers the endpoint, prints its id
      gc-agent start my-laptop --detach
      gc-agent list
      gc-agent stop my-laptop
    """
    ctx.obj = resolve_settings(home=home)


def _fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


@main.command()
@click.argument("name")
@click.option("--engine", type=click.Choice(["processes", "threads"]), default="processes",
              show_default=True, help="Run tasks in worker processes or in threads.")
@click.option("--workers", type=click.IntRange(1, 1024), default=os.cpu_count() or 2,
              show_default="number of CPUs", help="How many tasks run at once.")
@click.option("--description", default="", help="Shown in `gc-client endpoints`.")
@click.option("--broker-url", default=None, help="Broker URL [default: $GC_BROKER_URL].")
@click.option("--registry-url", default=None, help="Registry URL [default: $GC_REGISTRY_URL].")
@click.pass_obj
def configure(settings: FabricSettings, name: str, engine: str, workers: int, description: str,
              broker_url: str | None, registry_url: str | None) -> None:
    """Register endpoint NAME, create its task queue, and write its config.yaml."""
    try:
        files = EndpointFiles.of(settings, name)
        if files.config.exists():
            existing = load_config(files.config)
            _fail(f"endpoint {name} is already configured (id {existing.endpoint_id}, "
                  f"{files.config}); edit that file, or `gc-agent delete {name}` first")
        registry = RegistryClient(registry_url or settings.registry_url, token=settings.token)
        endpoint = registry.create_endpoint(name, owner=settings.user, description=description)
        config = EndpointConfig(name=name, endpoint_id=endpoint.endpoint_id,
                                description=description, broker_url=broker_url,
                                registry_url=registry_url,
                                engine=EngineConfig(type=engine, max_workers=workers))  # type: ignore[arg-type]
        _declare_queues(config, broker_url or settings.broker_url)
        save_config(config, files.config)
    except GCError as exc:
        _fail(str(exc))
    click.echo(f"Configured endpoint {name}: {endpoint.endpoint_id}")
    click.echo(f"Config: {files.config}")
    click.echo(f"Start it with: gc-agent start {name} --detach")


def _declare_queues(config: EndpointConfig, broker_url: str) -> None:
    """Create the endpoint's queues now, so tasks sent before its first start wait there."""
    topology = load_topology()
    session = BrokerSession(broker_url, name=f"gc-agent-configure:{config.endpoint_id}",
                            topology=topology, queues=[
                                topology.queue("endpoint_tasks", endpoint_id=config.endpoint_id),
                                topology.queue("endpoint_commands", endpoint_id=config.endpoint_id)])
    session.start()
    session.close()


@main.command()
@click.argument("name")
@click.option("--detach", is_flag=True, help="Run in the background; logs go to agent.log.")
@click.option("--log-file", type=click.Path(path_type=Path), default=None, hidden=True)
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.pass_obj
def start(settings: FabricSettings, name: str, detach: bool, log_file: Path | None,
          log_level: str) -> None:
    """Start the agent of endpoint NAME (in the foreground unless --detach)."""
    try:
        files = EndpointFiles.of(settings, name)
        config = load_config(files.config)
        pid = files.running_pid()
        if pid is not None:
            _fail(f"endpoint {name} is already running (pid {pid}); "
                  f"`gc-agent stop {name}` first")
        if detach:
            pid = spawn_detached(files, name)
            click.echo(f"Endpoint {name} ({config.endpoint_id}) started, pid {pid}; "
                       f"log: {files.log}")
            return
        configure_logging(log_level, log_file=log_file)
        _serve(Agent(config, settings), files)
    except GCError as exc:
        _fail(str(exc))


def _serve(agent: Agent, files: EndpointFiles) -> None:
    """Run until SIGTERM or SIGINT, then drain and exit 0."""
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.start()
    files.pid.write_text(str(os.getpid()))
    try:
        while not stop.wait(1.0):
            pass
        agent.stop()
    finally:
        files.pid.unlink(missing_ok=True)


@main.command()
@click.argument("name")
@click.option("--timeout", default=60.0, show_default=True,
              help="Seconds to wait for running tasks before the agent is killed.")
@click.pass_obj
def stop(settings: FabricSettings, name: str, timeout: float) -> None:
    """Stop the agent of endpoint NAME; running tasks finish or go back to the queue."""
    try:
        files = EndpointFiles.of(settings, name)
        load_config(files.config)
    except GCError as exc:
        _fail(str(exc))
    pid = files.running_pid()
    if pid is None:
        _fail(f"endpoint {name} is not running")
        return
    if stop_process(pid, timeout=timeout):
        click.echo(f"Endpoint {name} stopped.")
    else:
        click.echo(f"Endpoint {name} did not drain within {timeout:.0f}s and was killed; "
                   "its unfinished tasks return to the queue.")


@main.command(name="list")
@click.pass_obj
def list_endpoints(settings: FabricSettings) -> None:
    """List the endpoints configured on this machine: name, id, status."""
    directory = settings.endpoints_dir
    rows = []
    for config_path in sorted(directory.glob("*/config.yaml")):
        files = EndpointFiles(config_path.parent)
        try:
            endpoint_id = load_config(config_path).endpoint_id
        except GCError as exc:
            endpoint_id = f"(invalid config: {exc})"
        pid = files.running_pid()
        rows.append((config_path.parent.name, endpoint_id,
                     f"running (pid {pid})" if pid else "stopped"))
    if not rows:
        click.echo(f"No endpoints configured in {directory}; try `gc-agent configure NAME`.")
        return
    width = max(len(r[0]) for r in rows)
    click.echo(f"{'NAME'.ljust(width)}  {'ENDPOINT ID'.ljust(36)}  STATUS")
    for row_name, endpoint_id, status in rows:
        click.echo(f"{row_name.ljust(width)}  {endpoint_id.ljust(36)}  {status}")


if __name__ == "__main__":
    main()
