"""gc-agent: configure, start, stop and list this machine's endpoints."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import click
import yaml

from gc_agent.agent import Agent
from gc_agent.config import (
    EndpointConfig,
    load_config,
    parse_config,
    read_token,
    save_config,
    write_token,
)
from gc_agent.daemon import EndpointFiles, spawn_detached, stop_process
from gc_agent.diagnose import collect, write_archive
from gc_agent.globus_config import translate as translate_globus_config
from gc_agent.sessions import agent_session, delete_endpoint_queues, endpoint_queues
from gc_agent.systemd import ENV_DIR, PACKAGED_UNIT, UNIT_DIR, BootInstall, systemd_running
from gc_core.broker_login import redact_url
from gc_core.cli import CommandLine, format_table
from gc_core.collector import freeze_startup_heap
from gc_core.errors import BrokerError, ConfigError, GCError, NotFound
from gc_core.extras import missing_extra
from gc_core.logs import configure_logging
from gc_core.registry_api.client import RegistryClient
from gc_core.registry_api.schemas import TokenIn
from gc_core.settings import FabricSettings, resolve_settings
from gc_core.topology import load_topology

__all__ = ["main"]


@click.group(cls=CommandLine, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="GC_HOME", default=None, metavar="DIR",
              help="Where endpoints keep their files [default: $GC_HOME or ~/.gc].")
@click.pass_context
def main(ctx: click.Context, home: str | None) -> None:
    """Run gc-fabric endpoints on this machine.

    \b
    Typical use:
      gc-agent configure my-laptop      # registers the endpoint, prints its id
      gc-agent start my-laptop --detach
      gc-agent status my-laptop
      gc-agent logs my-laptop -f
      gc-agent enable-on-boot my-laptop # as root: a systemd service
      gc-agent stop my-laptop
    """
    problem = missing_extra("agent")
    if problem is not None:
        raise click.ClickException(f"gc-agent {problem}")
    ctx.obj = resolve_settings(home=home)


@main.command()
@click.argument("name")
@click.option("--engine", type=click.Choice(["processes", "threads"]), default=None,
              show_default="processes", help="Run tasks in worker processes or in threads.")
@click.option("--workers", type=click.IntRange(1, 1024), default=None,
              show_default="number of CPUs", help="How many tasks run at once.")
@click.option("--from-globus-compute", "globus_config", default=None, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Take the endpoint's settings from a Globus Compute endpoint config.yaml.")
@click.option("--description", default="", help="Shown in `gc-client endpoints`.")
@click.option("--broker-url", default=None, help="Broker URL [default: $GC_BROKER_URL].")
@click.option("--registry-url", default=None, help="Registry URL [default: $GC_REGISTRY_URL].")
@click.pass_obj
def configure(settings: FabricSettings, name: str, engine: str | None, workers: int | None,
              globus_config: Path | None, description: str, broker_url: str | None,
              registry_url: str | None) -> None:
    """Register endpoint NAME, create its task queue, and write its config.yaml."""
    files = EndpointFiles.of(settings, name)
    if files.config.exists():
        existing = load_config(files.config)
        raise click.ClickException(
            f"endpoint {name} is already configured (id {existing.endpoint_id}, "
            f"{files.config}); edit that file, or `gc-agent delete {name}` first")
    sections = _endpoint_sections(engine, workers, globus_config)
    if description:
        sections["description"] = description
    sections.update(name=name, broker_url=broker_url, registry_url=registry_url)
    source = str(globus_config or "the command line")
    parse_config({**sections, "endpoint_id": "not-yet-registered"}, source)  # before registering
    registry = RegistryClient(registry_url or settings.registry_url, token=settings.token)
    endpoint = registry.create_endpoint(name, owner=settings.user,
                                        description=sections.get("description", ""))
    token_file, agent_token = None, None
    if settings.token:  # logged in: the agent gets a token of its endpoint's own
        agent_token = registry.issue_token(TokenIn(label=f"agent of {name}",
                                                   endpoint_id=endpoint.endpoint_id)).token
        token_file = files.directory.resolve() / "agent.token"
        write_token(agent_token, token_file)
    config = parse_config({**sections, "endpoint_id": endpoint.endpoint_id,
                           "token_file": token_file}, source)
    _declare_queues(config, config.broker_url_or(settings.broker_url), agent_token)
    save_config(config, files.config)
    click.echo(f"Configured endpoint {name}: {endpoint.endpoint_id}")
    click.echo(f"Config: {files.config}")
    click.echo(f"Start it with: gc-agent start {name} --detach")


def _endpoint_sections(engine: str | None, workers: int | None,
                       globus_config: Path | None) -> dict[str, Any]:
    """The config's settings from --engine and --workers, or from a Globus Compute config
    (mapped onto ours: each key honoured or refused, saying why)."""
    if globus_config is None:
        return {"engine": {"type": engine or "processes",
                           "max_workers": workers or os.cpu_count() or 2}}
    if engine is not None or workers is not None:
        raise click.UsageError("--engine and --workers cannot be given with "
                               "--from-globus-compute: its engine section says both")
    try:
        data = yaml.safe_load(globus_config.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {globus_config}: {exc}") from exc
    try:
        return translate_globus_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{globus_config}: {exc}") from exc


def _declare_queues(config: EndpointConfig, broker_url: str, token: str | None) -> None:
    """Create the endpoint's queues now, so tasks sent before its first start wait there
    (as the agent: on a secured broker only it may)."""
    session = agent_session(config, broker_url, token, purpose="configure",
                            queues=endpoint_queues(config, load_topology()))
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
    files = EndpointFiles.of(settings, name)
    config = load_config(files.config)
    if config.token_file is not None:  # the agent is its endpoint, not whoever starts it
        settings = settings.model_copy(update={"token": read_token(config.token_file)})
    stale = files.pid.exists()
    pid = files.running_pid()
    if stale and pid is None:
        click.echo(f"Removed a stale pid file ({files.pid}): its agent is no longer running.",
                   err=True)
    if pid is not None:
        raise click.ClickException(f"endpoint {name} is already running (pid {pid}); "
                                   f"`gc-agent stop {name}` first")
    if detach:
        pid = spawn_detached(files, name)
        click.echo(f"Endpoint {name} ({config.endpoint_id}) started, pid {pid}; "
                   f"log: {files.log}")
        return
    configure_logging(log_level, log_file=log_file)
    broker_url = redact_url(config.broker_url_or(settings.broker_url))
    agent = Agent(config, settings, on_heartbeat=lambda heartbeat, problem:
                  files.write_status(heartbeat, problem, broker_url))
    _serve(agent, files)


def _serve(agent: Agent, files: EndpointFiles) -> None:
    """Run until SIGTERM or SIGINT, then drain and exit 0."""
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    freeze_startup_heap()
    agent.start(timeout=agent.config.connect_timeout)
    files.pid.write_text(str(os.getpid()))
    try:
        while not stop.wait(0.2) and not agent.idle.is_set() and not agent.broken.is_set():
            pass
        agent.stop()
    finally:
        files.pid.unlink(missing_ok=True)
        files.status.unlink(missing_ok=True)
    if agent.broken.is_set():
        raise BrokerError(f"the agent's broker session gave up: {agent.broker_problem()}")


@main.command()
@click.argument("name")
@click.option("--timeout", default=60.0, show_default=True,
              help="Seconds to wait for running tasks before the agent is killed.")
@click.pass_obj
def stop(settings: FabricSettings, name: str, timeout: float) -> None:
    """Stop the agent of endpoint NAME; running tasks finish or go back to the queue."""
    files = _configured(settings, name)
    if files.running_pid() is None:
        raise click.ClickException(f"endpoint {name} is not running")
    if _stop_agent(files, name, timeout):
        click.echo(f"Endpoint {name} stopped.")


def _stop_agent(files: EndpointFiles, name: str, timeout: float) -> bool:
    """Drain the running agent (if any); True if it stopped by itself."""
    pid = files.running_pid()
    if pid is None or stop_process(pid, timeout=timeout):
        return True
    click.echo(f"Endpoint {name} did not drain within {timeout:.0f}s and was killed; "
               "its unfinished tasks return to the queue.")
    return False


@main.command()
@click.argument("name")
@click.option("--timeout", default=60.0, show_default=True,
              help="Seconds to wait for running tasks before the old agent is killed.")
@click.pass_obj
def restart(settings: FabricSettings, name: str, timeout: float) -> None:
    """Stop the agent of NAME (draining it) and start it again in the background.

    The endpoint keeps its id and queue: tasks sent meanwhile wait for the new agent.
    """
    files = _configured(settings, name)
    _stop_agent(files, name, timeout)
    pid = spawn_detached(files, name)
    click.echo(f"Endpoint {name} restarted, pid {pid}.")


@main.command()
@click.argument("name")
@click.pass_obj
def status(settings: FabricSettings, name: str) -> None:
    """Show whether NAME runs, its pid, uptime, broker connection, queue and tasks."""
    files = _configured(settings, name)
    config = load_config(files.config)
    pid = files.running_pid()
    click.echo(f"endpoint:   {name} ({config.endpoint_id})")
    if pid is None:
        click.echo("agent:      stopped")
        return
    click.echo(f"agent:      running, pid {pid}")
    record = files.read_status()
    if record is None:
        click.echo("            (no heartbeat recorded yet)")
        return
    age = time.time() - record["sent"]
    click.echo(f"uptime:     {_duration(time.time() - record['started'])}")
    problem = record.get("broker_problem")
    click.echo(f"broker:     {'connected' if record['broker_connected'] else 'DISCONNECTED'} "
               f"({record['broker_url']}){f': {problem}' if problem else ''}")
    click.echo(f"engine:     {record['engine']}, {record['workers']} workers, "
               f"{record['workers_busy']} busy")
    depth = record.get("queue_depth")
    click.echo("queue:      tasks waiting not counted yet (the next heartbeat counts them)"
               if depth is None else f"queue:      {depth} tasks waiting")
    click.echo(f"tasks:      {record['tasks_received']} received, {record['tasks_succeeded']} "
               f"succeeded, {record['tasks_failed']} failed, "
               f"{record.get('tasks_cancelled', 0)} cancelled")
    if age > 3 * record["period"]:
        click.echo(f"warning:    last heartbeat {age:.0f}s ago; the agent may be stuck")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


@main.command(name="render-config")
@click.argument("name")
@click.pass_obj
def render_config(settings: FabricSettings, name: str) -> None:
    """Print NAME's effective configuration: config.yaml with every default filled in."""
    config = load_config(_configured(settings, name).config)
    effective = config.model_dump(mode="json")
    effective["allowed_serializers"] = sorted(effective["allowed_serializers"])
    effective["broker_url"] = redact_url(config.broker_url_or(settings.broker_url))
    effective["registry_url"] = config.registry_url or settings.registry_url
    click.echo(yaml.safe_dump(effective, sort_keys=False), nl=False)


@main.command()
@click.argument("name")
@click.option("--lines", "-n", default=50, show_default=True, help="How many lines to show.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines (Ctrl-C to stop).")
@click.pass_obj
def logs(settings: FabricSettings, name: str, lines: int, follow: bool) -> None:
    """Show the log of NAME's detached agent (rotated at 10 MB, 5 kept)."""
    files = _configured(settings, name)
    if not files.log.exists():
        raise click.ClickException(f"no log yet at {files.log}; the agent logs there when "
                                   "started with --detach")
    with open(files.log, errors="replace") as log:
        for line in log.readlines()[-lines:]:
            click.echo(line, nl=False)
        while follow:
            line = log.readline()
            if line:
                click.echo(line, nl=False)
            else:
                time.sleep(0.2)


@main.command()
@click.argument("name")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write the archive [default: gc-diagnose-NAME-<UTC time>.tar.gz].")
@click.option("--log-lines", type=click.IntRange(0), default=200, show_default=True,
              help="Lines of the agent's log to include.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds to wait for the broker.")
@click.pass_obj
def diagnose(settings: FabricSettings, name: str, output: Path | None, log_lines: int,
             timeout: float) -> None:
    """Collect what a bug report about NAME needs into one archive: versions, the config,
    broker and registry reachability, queue depth, engine status and the log's tail.

    Secrets (tokens, passwords, broker URL credentials) are masked in every file.
    """
    configure_logging("CRITICAL")  # what fails is the diagnosis's finding, in the archive
    found = collect(settings, name, log_lines=log_lines, timeout=timeout)
    path = output or Path(f"gc-diagnose-{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
                          ".tar.gz")
    write_archive(found, path)
    click.echo(found.members["summary.txt"].decode(), nl=False)
    click.echo(f"\nWrote {path}: attach it to your bug report.")


@main.command()
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--with-queues", is_flag=True,
              help="Also delete its queues on the broker, with any tasks waiting there.")
@click.option("--local-only", is_flag=True,
              help="Do not ask the registry: only stop the agent and remove the local files "
                   "(of an endpoint the registry no longer has).")
@click.pass_obj
def delete(settings: FabricSettings, name: str, yes: bool, with_queues: bool,
           local_only: bool) -> None:
    """Delete endpoint NAME: stop its agent, remove it from the registry (revoking its
    agent token) and remove its local files.

    Its queue keeps any tasks still waiting (no new endpoint takes them over) unless
    --with-queues deletes it, and the ledger keeps its tasks' results.
    """
    files = _configured(settings, name)
    config = load_config(files.config)
    registry_url = config.registry_url or settings.registry_url
    if not yes:
        registry_part = "" if local_only else (f", remove it from the registry at {registry_url}"
                                               " and revoke its agent token")
        click.confirm(f"Delete endpoint {name} ({config.endpoint_id}): stop its agent"
                      f"{registry_part}, and remove {files.directory}?", abort=True)
    _stop_agent(files, name, 60.0)
    if with_queues:  # before the registry revokes the agent's token, which may log in here
        token = read_token(config.token_file) if config.token_file else settings.token
        deleted = delete_endpoint_queues(config, config.broker_url_or(settings.broker_url), token)
        click.echo(f"Deleted its queues {', '.join(deleted)}.")
    if not local_only:
        _unregister(RegistryClient(registry_url, token=settings.token), name, config.endpoint_id)
    shutil.rmtree(files.directory)
    click.echo(f"Endpoint {name} deleted.")


def _unregister(registry: RegistryClient, name: str, endpoint_id: str) -> None:
    """Remove an endpoint from the registry, which revokes its agent tokens.

    Raises:
        NotFound: the registry has no such endpoint that the caller may see; nothing is
            deleted (it may be someone else's, or another registry's), and it says what to do.
    """
    try:
        registry.delete_endpoint(endpoint_id)
    except NotFound as exc:
        raise NotFound(f"{exc}; nothing was deleted. If the endpoint was removed from the "
                       f"registry already, `gc-agent delete {name} --local-only` removes its "
                       "local files") from exc
    finally:
        registry.close()


@main.command(name="enable-on-boot")
@click.argument("name")
@click.option("--user", "run_as", default=None, help="Account the service runs as [default: you].")
@click.option("--unit-dir", type=click.Path(path_type=Path), default=UNIT_DIR, show_default=True)
@click.option("--env-dir", type=click.Path(path_type=Path), default=ENV_DIR, show_default=True)
@click.pass_obj
def enable_on_boot(settings: FabricSettings, name: str, run_as: str | None, unit_dir: Path,
                   env_dir: Path) -> None:
    """Install NAME as the systemd service gc-agent@NAME (Restart=always) and enable it."""
    files = _configured(settings, name)
    account = run_as or getpass.getuser()
    if account != getpass.getuser() and not _readable_by(account, files.config):
        raise click.ClickException(
            f"the service account {account} cannot read {files.config}; configure the "
            f"endpoint under a GC_HOME that {account} owns (e.g. GC_HOME=/var/lib/gc-fabric)")
    boot = BootInstall(name, unit_dir, env_dir)
    try:
        boot.install(settings, account)
    except OSError as exc:
        raise click.ClickException(f"cannot write {boot.unit_path} or {boot.env_path}: {exc}; "
                                   "run as root, or give --unit-dir and --env-dir") from None
    unit = PACKAGED_UNIT if boot.uses_packaged_unit else boot.unit_path
    click.echo(f"Wrote {boot.env_path}; the unit is {unit}.")
    if not systemd_running():
        click.echo(f"systemd is not running on this machine, so nothing was enabled; where it "
                   f"runs: systemctl daemon-reload && systemctl enable --now {boot.instance}")
        return
    for args in (("daemon-reload",), ("enable", "--now")):
        done = (subprocess.run(["systemctl", *args], check=False, capture_output=True, text=True)
                if args == ("daemon-reload",) else boot.systemctl(*args))
        if done.returncode != 0:
            raise click.ClickException(f"systemctl {' '.join(args)} failed: {done.stderr.strip()}")
    click.echo(f"Enabled and started {boot.instance}.")


@main.command(name="disable-on-boot")
@click.argument("name")
@click.option("--unit-dir", type=click.Path(path_type=Path), default=UNIT_DIR, show_default=True)
@click.option("--env-dir", type=click.Path(path_type=Path), default=ENV_DIR, show_default=True)
@click.pass_obj
def disable_on_boot(settings: FabricSettings, name: str, unit_dir: Path, env_dir: Path) -> None:
    """Stop and disable the systemd service of NAME and remove its settings file."""
    boot = BootInstall(name, unit_dir, env_dir)
    if systemd_running():
        done = boot.systemctl("disable", "--now")
        if done.returncode != 0:
            raise click.ClickException(f"systemctl disable failed: {done.stderr.strip()}")
    boot.remove()
    click.echo(f"{boot.instance} disabled; removed {boot.env_path}.")


def _readable_by(account: str, path: Path) -> bool:
    """Whether ``account`` can read ``path`` (checked as that account)."""
    done = subprocess.run(["su", "-s", "/bin/sh", account, "-c", f"test -r '{path}'"], check=False,
                          capture_output=True)
    return done.returncode == 0


def _configured(settings: FabricSettings, name: str) -> EndpointFiles:
    """The files of a configured endpoint.

    Raises:
        ConfigError: NAME is not configured (saying how to), or its config is invalid.
    """
    files = EndpointFiles.of(settings, name)
    load_config(files.config)
    return files


@main.command(name="list")
@click.pass_obj
def list_endpoints(settings: FabricSettings) -> None:
    """List the endpoints configured on this machine: name, id, status."""
    directory = settings.endpoints_dir
    rows = []
    for config_path in sorted(directory.glob("*/config.yaml")):
        files = EndpointFiles(config_path.parent)
        name = config_path.parent.name
        try:
            endpoint_id = load_config(config_path).endpoint_id
        except GCError:  # the table keeps one line a row: `status` shows the whole error
            endpoint_id = f"(invalid config.yaml: see `gc-agent status {name}`)"
        pid = files.running_pid()
        rows.append((name, endpoint_id, f"running (pid {pid})" if pid else "stopped"))
    if not rows:
        click.echo(f"No endpoints configured in {directory}; try `gc-agent configure NAME`.")
        return
    click.echo(format_table(["NAME", "ENDPOINT ID", "STATUS"], rows))


if __name__ == "__main__":
    main()
