"""Identities, tokens and policies through a registry that checks tokens, a real agent and
the real CLIs: login/whoami/logout, the agents' re-check, and a gateway's service account.

The broker here is the shared one (guest URLs keep their credentials), so what is proven is
the registry's and the agent's part; test_broker_auth.py proves the broker's.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gc_client import Client, Executor
from gc_core.errors import NotAuthenticated, PolicyError
from gc_core.registry_api.client import RegistryClient
from gc_core.registry_api.schemas import FunctionSharing
from tests.fabric import Endpoint, Fabric, eventually
from tests.integration.conftest import OwnRegistry

REPO = Path(__file__).resolve().parents[2]


@dataclass
class AgentFabric(Fabric):
    """A fabric whose agents run with an agent token."""

    token: str = ""

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, "GC_TOKEN": self.token}


@dataclass
class TokenFabric:
    """A tokens-mode registry with users alice, bob and service account portal."""

    fabric: Fabric
    db_url: str
    tokens: dict[str, str] = field(default_factory=dict)

    def admin(self, *args: str) -> str:
        """Run `gc-registry ARGS --db DB` and return its stdout."""
        return self.fabric.cli("gc-registry", *args, "--db", self.db_url).stdout.strip()

    def env(self, user: str, **extra: str) -> dict[str, str]:
        return {**self.fabric.env, "GC_TOKEN": self.tokens[user], "GC_USER": user, **extra}

    def client(self, user: str, **kwargs: str) -> Client:
        return Client(broker_url=self.fabric.broker_url, registry_url=self.fabric.registry_url,
                      home=str(self.fabric.home), token=self.tokens[user], user=user, **kwargs)


@pytest.fixture(scope="module")
def tokens(own_registry: OwnRegistry, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[TokenFabric]:
    home = tmp_path_factory.mktemp("tokens-home")
    db_url = f"sqlite:///{home / 'registry.db'}"
    server, broker_url = own_registry(db_url, "tokens")
    made = TokenFabric(Fabric(broker_url=broker_url, registry_url=server.url, home=home,
                              vhost=""), db_url)
    made.admin("user", "create", "alice")
    made.admin("user", "create", "bob")
    made.admin("user", "create", "portal", "--service")
    for user in ("alice", "bob", "portal"):
        made.tokens[user] = made.admin("token", "create", user, "--label", "tests")
    yield made


@pytest.fixture(scope="module")
def alices_endpoint(tokens: TokenFabric) -> Iterator[Endpoint]:
    """An endpoint alice owns, open to the portal, whose agent has its own agent token."""
    fabric = tokens.fabric
    configured = subprocess.run(
        [str(Path(sys.executable).parent / "gc-agent"), "configure", "alices", "--workers", "2"],
        env=tokens.env("alice"), capture_output=True, text=True, check=True)
    endpoint_id = configured.stdout.split(":", 1)[1].split()[0]
    subprocess.run([str(Path(sys.executable).parent / "gc-client"), "policy", "set", endpoint_id,
                    "--allow-user", "portal"], env=tokens.env("alice"), check=True,
                   capture_output=True)
    agent_token = subprocess.run(
        [str(Path(sys.executable).parent / "gc-client"), "tokens", "create", "--endpoint",
         endpoint_id, "--label", "agent"],
        env=tokens.env("alice"), capture_output=True, text=True, check=True).stdout.strip()
    endpoint = Endpoint(AgentFabric(broker_url=fabric.broker_url,
                                    registry_url=fabric.registry_url, home=fabric.home, vhost="",
                                    token=agent_token), "alices", endpoint_id)
    endpoint.start()
    yield endpoint
    endpoint.stop_all()


def square(x: int) -> int:
    return x * x


# -- login, whoami, logout -----------------------------------------------------------------


def test_login_stores_the_token_for_its_owner_alone_and_logout_revokes_it(
        tokens: TokenFabric, tmp_path: Path) -> None:
    token = tokens.admin("token", "create", "bob", "--label", "laptop")
    env = {**tokens.fabric.env, "GC_HOME": str(tmp_path)}
    env.pop("GC_TOKEN", None)
    cli = str(Path(sys.executable).parent / "gc-client")
    login = subprocess.run([cli, "login", "--token-stdin"], input=token + "\n", env=env,
                           capture_output=True, text=True)
    assert login.returncode == 0, login.stderr
    assert "as bob" in login.stdout
    credentials = tmp_path / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    whoami = subprocess.run([cli, "whoami"], env=env, capture_output=True, text=True)
    assert whoami.stdout.startswith("bob (user; no groups)")
    assert subprocess.run([cli, "logout"], env=env, capture_output=True).returncode == 0
    assert not credentials.exists()
    with pytest.raises(NotAuthenticated, match="was revoked"):
        RegistryClient(tokens.fabric.registry_url, token=token).whoami()


def test_a_bad_token_at_login_is_refused_with_a_sentence_not_a_traceback(
        tokens: TokenFabric, tmp_path: Path) -> None:
    env = {**tokens.fabric.env, "GC_HOME": str(tmp_path)}
    done = subprocess.run([str(Path(sys.executable).parent / "gc-client"), "login",
                           "--token-stdin"], input="gct_wrong\n", env=env, capture_output=True,
                          text=True)
    assert done.returncode == 1
    assert "the registry refused this token: the registry does not know this token" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "credentials.json").exists()


def test_a_request_without_a_token_is_told_how_to_get_one(tokens: TokenFabric) -> None:
    with pytest.raises(NotAuthenticated, match="needs a token: run `gc-client login`"):
        RegistryClient(tokens.fabric.registry_url).list_endpoints()


def test_an_expired_token_is_refused_saying_it_expired(tokens: TokenFabric) -> None:
    token = tokens.admin("token", "create", "bob", "--expires-in", "1s")
    eventually(lambda: _refusal(tokens, token) is not None, timeout=10)
    assert "expired at" in str(_refusal(tokens, token))


def _refusal(tokens: TokenFabric, token: str) -> NotAuthenticated | None:
    try:
        RegistryClient(tokens.fabric.registry_url, token=token).whoami()
    except NotAuthenticated as exc:
        return exc
    return None


# -- policies, the agent's re-check, gateways ----------------------------------------------


def test_the_owner_runs_tasks_and_others_are_refused_by_the_agent_saying_why(
        tokens: TokenFabric, alices_endpoint: Endpoint) -> None:
    with tokens.client("alice") as alice, Executor(alices_endpoint.endpoint_id,
                                                   client=alice) as ex:
        assert ex.submit(square, 7).result(timeout=60) == 49
    with tokens.client("bob") as bob, Executor(alices_endpoint.endpoint_id, client=bob) as ex:
        with pytest.raises(PolicyError) as refused:
            ex.submit(square, 7).result(timeout=60)
    assert refused.value.remote_type == "PolicyError"
    assert f"bob is not allowed to use endpoint {alices_endpoint.endpoint_id}" in str(refused.value)


def test_a_gateway_submits_for_its_end_users_and_the_ledger_records_both(
        tokens: TokenFabric, alices_endpoint: Endpoint) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "gateway_service_account.py")],
        env=tokens.env("portal", GC_ENDPOINT_ID=alices_endpoint.endpoint_id),
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "gateway account: portal" in done.stdout
    assert "for carol@uni.edu   sample-17:" in done.stdout
    assert done.stdout.count("by portal on behalf of carol@uni.edu: success") == 2
    assert done.stdout.count("by portal on behalf of dave@lab.org: success") == 1


def test_only_a_service_account_may_submit_on_someone_elses_behalf(
        tokens: TokenFabric, alices_endpoint: Endpoint) -> None:
    with tokens.client("alice", on_behalf_of="mallory") as alice, \
            Executor(alices_endpoint.endpoint_id, client=alice) as ex:
        with pytest.raises(PolicyError, match="alice is not a service account"):
            ex.submit(square, 2).result(timeout=60)


def test_a_private_function_of_one_user_cannot_be_run_by_another(
        tokens: TokenFabric, alices_endpoint: Endpoint) -> None:
    with tokens.client("alice") as alice:
        function_id = alice.register_function(square)
    with tokens.client("portal") as portal, Executor(alices_endpoint.endpoint_id,
                                                     client=portal) as ex:
        allowed = portal.get_allowed_functions(alices_endpoint.endpoint_id)
        assert function_id not in {f.function_id for f in allowed}
        with pytest.raises(PolicyError, match="is not shared with portal"):
            ex.submit_to_registered_function(function_id, (3,)).result(timeout=60)
        with tokens.client("alice") as alice:
            alice.share_function(function_id, FunctionSharing(sharing="public"))
        allowed = portal.get_allowed_functions(alices_endpoint.endpoint_id)
        assert function_id in {f.function_id for f in allowed}


def test_a_task_is_its_submitters_to_read(tokens: TokenFabric, alices_endpoint: Endpoint) -> None:
    with tokens.client("alice") as alice:
        task_id = alice.run(5, endpoint_id=alices_endpoint.endpoint_id,
                            function_id=alice.register_function(square))
        eventually(lambda: alice.get_task(task_id).status == "success", timeout=60)
        with tokens.client("bob") as bob:
            assert bob.get_task(task_id).status == "unknown"

