"""gc-client verbs about who you are and what you share: login, whoami, logout, tokens,
policy and share.

They run inside ``gc-client``'s group, so their errors end the way every command's do
(:mod:`gc_core.cli`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from gc_core.cli import format_table
from gc_core.errors import GCError, NotAuthenticated
from gc_core.registry_api.client import RegistryClient
from gc_core.registry_api.schemas import EndpointPolicy, FunctionSharing, TokenIn
from gc_core.settings import CREDENTIALS_FILE, resolve_settings

__all__ = ["COMMANDS"]


@contextmanager
def _registry() -> Iterator[RegistryClient]:
    """The registry with the stored token, closed after use."""
    settings = resolve_settings()
    registry = RegistryClient(settings.registry_url, token=settings.token)
    try:
        yield registry
    finally:
        registry.close()


@click.command()
@click.option("--token-stdin", is_flag=True, help="Read the token from stdin instead of a prompt.")
@click.option("--registry-url", default=None, metavar="URL",
              help="Registry to log in to [default: $GC_REGISTRY_URL or the local one].")
@click.option("--broker-url", default=None, metavar="URL",
              help="Broker to remember with the login [default: $GC_BROKER_URL].")
def login(token_stdin: bool, registry_url: str | None, broker_url: str | None) -> None:
    """Store a token your administrator issued, after the registry accepts it.

    The token is kept in $GC_HOME/credentials.json, readable by you alone (mode 0600);
    every gc-client, Client and Executor in this GC_HOME then uses it.
    """
    if token_stdin:
        token = sys.stdin.readline().strip()
    else:
        token = str(click.prompt("Token", hide_input=True)).strip()
    settings = resolve_settings(registry_url=registry_url, broker_url=broker_url, token=token)
    registry = RegistryClient(settings.registry_url, token=token)
    try:
        me = registry.whoami()
    except NotAuthenticated as exc:
        raise NotAuthenticated(f"the registry refused this token: {exc}") from None
    finally:
        registry.close()
    settings.home.mkdir(parents=True, exist_ok=True)
    path = settings.home / CREDENTIALS_FILE
    stored = {"token": token, "user": me.name, "registry_url": settings.registry_url,
              "broker_url": settings.broker_url}
    # Created 0600 from the start: the token must never be readable by others, even briefly.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump(stored, out)
    groups = f" (groups: {', '.join(me.groups)})" if me.groups else ""
    click.echo(f"Logged in to {settings.registry_url} as {me.name}{groups}.")


@click.command()
def whoami() -> None:
    """Show who the registry takes you to be."""
    with _registry() as registry:
        me = registry.whoami()
    if me.auth == "open":
        click.echo(f"{me.name} (this registry is open: identities are not checked)")
        return
    extras = [me.kind] + (["admin"] if me.admin else []) + [f"groups: {', '.join(me.groups)}"
                                                          if me.groups else "no groups"]
    click.echo(f"{me.name} ({'; '.join(extras)}) at {registry.url}")


@click.command()
@click.option("--keep-token", is_flag=True,
              help="Only forget the token here; do not revoke it at the registry.")
def logout(keep_token: bool) -> None:
    """Revoke the stored token at the registry, with every token it issued (such as agent
    tokens `gc-agent configure` made with it), and forget it here."""
    settings = resolve_settings()
    path = settings.home / CREDENTIALS_FILE
    if not path.exists():
        click.echo("Not logged in (no stored token).")
        return
    if not keep_token:
        registry = RegistryClient(settings.registry_url, token=settings.token)
        try:
            token_id = registry.whoami().token_id
            if token_id:
                registry.revoke_token(token_id)
        except NotAuthenticated:
            pass  # already revoked or expired: nothing left to revoke
        except GCError as exc:
            raise GCError(f"{exc}; the token was NOT revoked or forgotten: retry, or use "
                          "--keep-token to only forget it here") from exc
        finally:
            registry.close()
    path.unlink()
    click.echo("Logged out." if keep_token
               else "Logged out; the token, and every token it issued, are revoked.")


@click.group()
def tokens() -> None:
    """Your tokens: list, create (e.g. an endpoint's agent token), revoke."""


@tokens.command("list")
def tokens_list() -> None:
    """List your tokens (never their secrets)."""
    with _registry() as registry:
        listed = registry.list_tokens()
    now = time.time()
    click.echo(format_table(["TOKEN ID", "STATE", "FOR", "EXPIRES", "ISSUED BY", "LABEL"], [
        [row.token_id, row.state(now),
         f"agent of {row.endpoint_id}" if row.endpoint_id else row.user,
         _when(row.expires) if row.expires else "never", row.parent or "an admin",
         row.label or None] for row in listed]))


@tokens.command("create")
@click.option("--label", default="", help="What it is for.")
@click.option("--lifetime", type=click.FloatRange(min=1), default=None,
              help="Seconds until it expires [default: the longest the registry allows: its "
                   "cap, and never past your own token's expiry]. It is revoked with the "
                   "token that issued it.")
@click.option("--endpoint", "endpoint_id", default=None,
              help="Issue the agent token of this endpoint (you must own it).")
def tokens_create(label: str, lifetime: float | None, endpoint_id: str | None) -> None:
    """Issue a token for yourself, or an agent token; the secret is printed once."""
    with _registry() as registry:
        issued = registry.issue_token(TokenIn(label=label, lifetime=lifetime,
                                              endpoint_id=endpoint_id))
    expires = f", expires {_when(issued.expires)}" if issued.expires else ""
    click.echo(f"token {issued.token_id} for {issued.principal}{expires}:", err=True)
    click.echo(issued.token)


@tokens.command("revoke")
@click.argument("token_id")
def tokens_revoke(token_id: str) -> None:
    """Revoke one of your tokens."""
    with _registry() as registry:
        registry.revoke_token(token_id)
    click.echo(f"revoked {token_id}")


@click.group()
def policy() -> None:
    """Who may use an endpoint you own, and what it runs."""


@policy.command("show")
@click.argument("endpoint_id")
def policy_show(endpoint_id: str) -> None:
    """Print an endpoint's policy as JSON."""
    with _registry() as registry:
        endpoint = registry.get_endpoint(endpoint_id)
    click.echo(json.dumps({"endpoint_id": endpoint.endpoint_id, "owner": endpoint.owner,
                           **endpoint.policy.model_dump()}, indent=2))


@policy.command("set")
@click.argument("endpoint_id")
@click.option("--visibility", type=click.Choice(["private", "listed"]), default=None,
              help="listed: everyone sees it in `gc-client endpoints`.")
@click.option("--allow-user", "users", multiple=True, help="A user who may submit (repeatable).")
@click.option("--allow-group", "groups", multiple=True, help="A group that may submit.")
@click.option("--allow-function", "functions", multiple=True,
              help="Run only these function ids (repeatable).")
@click.option("--any-function", is_flag=True, help="Drop the function restriction.")
@click.option("--allow-serializer", "serializers", multiple=True,
              help="Accept only these content types, e.g. application/json.")
@click.option("--replace", is_flag=True, help="Replace the lists instead of adding to them.")
def policy_set(endpoint_id: str, visibility: str | None, users: tuple[str, ...],
               groups: tuple[str, ...], functions: tuple[str, ...], any_function: bool,
               serializers: tuple[str, ...], replace: bool) -> None:
    """Change an endpoint's policy; lists are added to unless --replace."""
    with _registry() as registry:
        current = registry.get_endpoint(endpoint_id).policy
        new = _merged(current, replace, visibility=visibility, allowed_users=users,
                      allowed_groups=groups, allowed_functions=functions,
                      allowed_serializers=serializers)
        if any_function:
            new = new.model_copy(update={"allowed_functions": None})
        updated = registry.set_endpoint_policy(endpoint_id, new)
    click.echo(json.dumps(updated.policy.model_dump(), indent=2))


def _merged(current: EndpointPolicy, replace: bool, **changes: Any) -> EndpointPolicy:
    """``current`` with each given list added (or, with ``replace``, substituted)."""
    update: dict[str, Any] = {}
    for key, value in changes.items():
        if key == "visibility":
            if value:
                update[key] = value
        elif value:
            base = [] if replace else list(getattr(current, key) or [])
            update[key] = list(dict.fromkeys([*base, *value]))
    return EndpointPolicy.model_validate({**current.model_dump(), **update})


@click.command()
@click.argument("function_id")
@click.option("--public", "scope", flag_value="public", help="Anyone may run it.")
@click.option("--private", "scope", flag_value="private", help="Only you may run it.")
@click.option("--group", "groups", multiple=True, help="Members of this group may (repeatable).")
def share(function_id: str, scope: str | None, groups: tuple[str, ...]) -> None:
    """Share a function you own: --public, --private, or --group NAME..."""
    if scope is None and not groups:
        raise click.UsageError("say how to share it: --public, --private or --group NAME")
    sharing = FunctionSharing(sharing="groups" if groups else scope,  # type: ignore[arg-type]
                              shared_groups=list(groups))
    with _registry() as registry:
        registry.share_function(function_id, sharing)
    click.echo(f"{function_id}: {sharing.sharing}"
               + (f" ({', '.join(groups)})" if groups else ""))


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp))


#: The commands this module adds to ``gc-client``.
COMMANDS = [login, whoami, logout, tokens, policy, share]
