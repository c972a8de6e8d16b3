"""gc-registry: run the registry service, and administer its users, groups and tokens."""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
import uvicorn
from pydantic import SecretStr
from sqlalchemy.orm import Session

from gc_core.broker_login import broker_vhost, redact_url
from gc_core.cli import CommandLine, format_table
from gc_core.collector import freeze_startup_heap
from gc_core.errors import RegistryError
from gc_core.logs import configure_logging
from gc_core.registry import identity, vhost_claim
from gc_core.registry.app import RegistrySettings, create_app
from gc_core.registry.db import open_database
from gc_core.registry.vhost_claim import DatabaseClaim
from gc_core.settings import resolve_settings
from gc_core.topology import load_topology

__all__ = ["main"]

logger = logging.getLogger("gc_core.registry")

_F = TypeVar("_F", bound=Callable[..., Any])
#: Where `serve` finds the secret the broker presents on /auth/*, without a file naming it.
BROKER_AUTH_SECRET_ENV = "GC_REGISTRY_BROKER_AUTH_SECRET"
_DURATION = re.compile(r"^(\d+)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _broker_url_options(what: str) -> Callable[[_F], _F]:
    """``--broker-url`` (``what``, with no password) and ``--broker-url-file``, which
    :func:`_broker_url` reads."""
    def add(command: _F) -> _F:
        command = click.option(
            "--broker-url-file", type=click.Path(exists=True, dir_okay=False), default=None,
            metavar="PATH", help="Read the broker URL, with the registry account's password, "
                                 "from this file (mode 600: no one else may read it).")(command)
        return click.option(
            "--broker-url", default=None, metavar="URL",
            help=f"{what}, without a password: anyone on this host reads a command line; a "
                 "cluster's nodes separated by commas [default: $GC_BROKER_URL or the local "
                 "one].")(command)
    return add


def _db_option(command: _F) -> _F:
    return click.option(
        "--db", "db_url", default=None, metavar="URL",
        help="SQLAlchemy database URL [default: sqlite:///$GC_HOME/registry.db]. "
             "PostgreSQL: postgresql+psycopg://user@host/dbname")(command)


def _database_url(db_url: str | None) -> str:
    if db_url is not None:
        return db_url
    home = resolve_settings().home
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'registry.db'}"


@contextmanager
def _session(db_url: str | None) -> Iterator[Session]:
    """A database session.

    Raises:
        RegistryError: the database cannot be opened, or refuses what was asked, such as
            a name already taken (``identity`` says that with a ValueError, which the HTTP
            API answers with a 422).
    """
    with open_database(_database_url(db_url))() as session:
        try:
            yield session
        except ValueError as exc:
            raise RegistryError(str(exc), status=422) from exc


@click.group(cls=CommandLine)
def main() -> None:
    """The gc-fabric registry: identities, policies, functions, endpoints and the task ledger.

    `serve` runs the service; `user`, `group` and `token` administer identities directly in
    its database (run them on the registry's host, as the account that owns the database).
    """


@main.command()
@_db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, type=int, help="Port to listen on.")
@_broker_url_options("Broker the ledger consumes from")
@click.option("--broker-auth-secret-file", type=click.Path(exists=True, dir_okay=False),
              default=None, metavar="PATH",
              help="The secret the broker presents on /auth/* (the password in its auth_http "
                   f"URLs) [default: ${BROKER_AUTH_SECRET_ENV}; none: /auth/* answers this "
                   "host only].")
@click.option("--no-ledger", is_flag=True, help="Do not consume the task ledger queue.")
@click.option("--auth", type=click.Choice(["tokens", "open"]), default="tokens", show_default=True,
              help="tokens: every request needs a token and policies hold. open: identities "
                   "are claimed, not proven (a laptop demo only).")
@click.option("--result-size-limit", type=click.IntRange(min=0), default=10 * 2**20,
              show_default=True, metavar="BYTES",
              help="Results larger than this keep their state in the ledger but not their value.")
@click.option("--result-ttl", default="30d", show_default=True, metavar="DURATION",
              help="How long the ledger keeps result values (e.g. 7d, 12h; 'forever').")
@click.option("--max-token-lifetime", default="90d", show_default=True, metavar="DURATION",
              help="Longest life of a token issued through the API (gc-client tokens create, "
                   "gc-agent configure); longer requests are refused. Such a token never "
                   "outlives, nor survives, the token that issued it. 'forever': no cap.")
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Serve HTTPS with this certificate (PEM, with any intermediates after it).")
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The certificate's private key (PEM); needed with --ssl-certfile.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def serve(db_url: str | None, host: str, port: int, broker_url: str | None,
          broker_url_file: str | None, broker_auth_secret_file: str | None, no_ledger: bool,
          auth: str, result_size_limit: int, result_ttl: str, max_token_lifetime: str,
          ssl_certfile: str | None, ssl_keyfile: str | None, log_level: str) -> None:
    """Serve the registry's HTTP API (HTTPS with --ssl-certfile) and record the task ledger."""
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise click.UsageError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    configure_logging(log_level)
    fabric = resolve_settings(broker_url=_broker_url(broker_url, broker_url_file))
    settings = RegistrySettings(
        db_url=_database_url(db_url), broker_url=fabric.broker_url, ledger=not no_ledger,
        auth=auth,  # type: ignore[arg-type]
        result_size_limit=result_size_limit,
        result_ttl=_duration_or_forever(result_ttl, "--result-ttl"),
        max_token_lifetime=_duration_or_forever(max_token_lifetime, "--max-token-lifetime"),
        broker_auth_secret=_broker_auth_secret(broker_auth_secret_file))
    if settings.broker_auth_secret is None and auth == "tokens":
        logger.warning("no broker secret: /auth/* answers any caller on this host; give the "
                       "broker one (--broker-auth-secret-file or %s)", BROKER_AUTH_SECRET_ENV)
    if auth == "open":
        logger.warning("registry is OPEN: anyone who reaches it may act as anyone; use "
                       "--auth tokens anywhere but a single-user demo")
    if settings.ledger:
        _claim_vhost(settings)
    app = create_app(settings)
    freeze_startup_heap()
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(),
                access_log=False, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)


def _claim_vhost(settings: RegistrySettings) -> None:
    """Refuse to serve a vhost whose ledger another database holds (``vhost_claim``), with
    that error's one line rather than a traceback from the app's start. The ledger claims
    again on each connection: with the broker away now, that is when it is checked."""
    sessions = open_database(settings.db_url)
    try:
        claim = DatabaseClaim.of(sessions, settings.db_url)
    finally:
        sessions.kw["bind"].dispose()
    if not vhost_claim.claim_vhost(settings.broker_url, load_topology(), claim):
        logger.warning("broker %s unreachable: the ledger claims its vhost for this database "
                       "once it connects", redact_url(settings.broker_url))


@main.command("release-vhost")
@_broker_url_options("The vhost's broker")
def release_vhost(broker_url: str | None, broker_url_file: str | None) -> None:
    """Release a broker vhost from the registry database its ledger belongs to.

    Registries that consume one vhost's ledger share one database: the first database
    served on a vhost keeps it, and a registry of another refuses to start there. To move
    the vhost to another database, stop every registry on it, run this (as the registry's
    broker account: it deletes the queue gc.registry.database), and start the registries
    of the new database.
    """
    fabric = resolve_settings(broker_url=_broker_url(broker_url, broker_url_file))
    vhost = broker_vhost(fabric.broker_url)
    claimed, holder = vhost_claim.release_vhost(fabric.broker_url, load_topology())
    if not claimed:
        click.echo(f"vhost {vhost!r} was not claimed by any registry database")
    elif holder is None:
        click.echo(f"released vhost {vhost!r} (its database left no description)")
    else:
        click.echo(f"released vhost {vhost!r} from {holder.database} (id {holder.database_id})")


@main.group()
def user() -> None:
    """Users and service accounts."""


@user.command("create")
@_db_option
@click.argument("name")
@click.option("--service", is_flag=True,
              help="A service account: a science gateway that submits for its own end users.")
@click.option("--admin", is_flag=True, help="May see and change everything.")
def user_create(db_url: str | None, name: str, service: bool, admin: bool) -> None:
    """Add a user (or with --service, a service account)."""
    with _session(db_url) as db:
        made = identity.create_user(db, name, kind="service" if service else "user", admin=admin)
    click.echo(f"created {made.kind} {made.name}" + (" (admin)" if made.admin else ""))


@user.command("list")
@_db_option
def user_list(db_url: str | None) -> None:
    """List users and service accounts with their groups."""
    with _session(db_url) as db:
        listed = identity.list_users(db)
    click.echo(format_table(["NAME", "KIND", "GROUPS"], [
        [row.name, f"{row.kind}{', admin' if row.admin else ''}", ",".join(row.groups) or None]
        for row in listed]))


@main.group()
def group() -> None:
    """Groups, which endpoint and function policies can name."""


@group.command("create")
@_db_option
@click.argument("name")
def group_create(db_url: str | None, name: str) -> None:
    """Add a group."""
    with _session(db_url) as db:
        identity.create_group(db, name)
    click.echo(f"created group {name}")


@group.command("add")
@_db_option
@click.argument("group_name", metavar="GROUP")
@click.argument("users", nargs=-1, required=True)
def group_add(db_url: str | None, group_name: str, users: tuple[str, ...]) -> None:
    """Put users in a group."""
    with _session(db_url) as db:
        for name in users:
            identity.add_member(db, group_name, name)
    click.echo(f"{group_name}: added {', '.join(users)}")


@group.command("remove")
@_db_option
@click.argument("group_name", metavar="GROUP")
@click.argument("users", nargs=-1, required=True)
def group_remove(db_url: str | None, group_name: str, users: tuple[str, ...]) -> None:
    """Take users out of a group."""
    with _session(db_url) as db:
        for name in users:
            identity.remove_member(db, group_name, name)
    click.echo(f"{group_name}: removed {', '.join(users)}")


@main.group()
def token() -> None:
    """Tokens: issue, list, revoke. Only a hash of each is stored."""


@token.command("create")
@_db_option
@click.argument("user_name", metavar="USER")
@click.option("--label", default="", help="What the token is for, shown in listings.")
@click.option("--expires-in", default=None, metavar="DURATION",
              help="Lifetime such as 90d, 12h, 30m [default: until revoked; serve's "
                   "--max-token-lifetime caps only tokens issued through the API].")
@click.option("--endpoint", "endpoint_id", default=None, metavar="ENDPOINT_ID",
              help="Issue the agent token of this endpoint (USER must own it).")
def token_create(db_url: str | None, user_name: str, label: str, expires_in: str | None,
                 endpoint_id: str | None) -> None:
    """Issue a token for USER; its secret is printed once, on stdout alone."""
    with _session(db_url) as db:
        issued = identity.issue_token(db, user_name, label=label,
                                      lifetime=_duration(expires_in, "--expires-in"),
                                      endpoint_id=endpoint_id)
    click.echo(f"issued token {issued.token_id} for {issued.principal}"
               + (f", expires {_when(issued.expires)}" if issued.expires else ""), err=True)
    click.echo(issued.token)


@token.command("list")
@_db_option
@click.option("--user", "user_name", default=None, help="Only this user's tokens.")
def token_list(db_url: str | None, user_name: str | None) -> None:
    """List tokens (never their secrets)."""
    with _session(db_url) as db:
        listed = identity.list_tokens(db, user_name)
    now = time.time()
    click.echo(format_table(["TOKEN ID", "FOR", "STATE", "EXPIRES", "LABEL"], [
        [row.token_id, f"endpoint-{row.endpoint_id}" if row.endpoint_id else row.user,
         row.state(now), _when(row.expires), row.label or None] for row in listed]))


@token.command("revoke")
@_db_option
@click.argument("token_ids", nargs=-1, required=True, metavar="TOKEN_ID...")
def token_revoke(db_url: str | None, token_ids: tuple[str, ...]) -> None:
    """Revoke tokens: the next request or broker connection with them is refused."""
    with _session(db_url) as db:
        for token_id in token_ids:
            identity.revoke_token(db, token_id)
    click.echo(f"revoked {', '.join(token_ids)}")


def _broker_url(url: str | None, url_file: str | None) -> str | None:
    """The broker URL from ``--broker-url-file``, else from ``--broker-url`` when it carries
    no password (the process list shows every argument to every user on the host)."""
    if url is not None and url_file is not None:
        raise click.UsageError("give --broker-url or --broker-url-file, not both")
    if url_file is not None:
        return _read_secret(url_file, "--broker-url-file")
    if url is not None and any(urlsplit(node).password is not None for node in url.split(",")):
        raise click.BadParameter(
            "it carries a password, which anyone on this host can read in the process list; "
            "put the URL in a file only the registry's account can read and pass "
            "--broker-url-file PATH, or set GC_BROKER_URL in the service's environment (a URL "
            "without credentials logs in as guest, an open broker's default)",
            param_hint="--broker-url")
    return url


def _broker_auth_secret(secret_file: str | None) -> SecretStr | None:
    if secret_file is not None:
        return SecretStr(_read_secret(secret_file, "--broker-auth-secret-file"))
    secret = os.environ.get(BROKER_AUTH_SECRET_ENV)
    return SecretStr(secret) if secret else None


def _read_secret(path: str, option: str) -> str:
    """The text of a file that holds a secret, which only its owner may read (as an agent's
    token file)."""
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise click.BadParameter(f"{path} holds a secret but others may read it (mode "
                                 f"{stat.filemode(mode)}): run `chmod 600 {path}`",
                                 param_hint=option)
    text = Path(path).read_text().strip()
    if not text:
        raise click.BadParameter(f"{path} is empty", param_hint=option)
    return text


def _duration_or_forever(text: str, option: str) -> float | None:
    return None if text == "forever" else _duration(text, option)


def _duration(text: str | None, option: str) -> float | None:
    if text is None:
        return None
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise click.BadParameter(f"{text!r} is not a duration; write e.g. 90d, 12h or 30m",
                                 param_hint=option)
    return int(match[1]) * _SECONDS[match[2]]


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp)) if timestamp else "never"


if __name__ == "__main__":
    main()
