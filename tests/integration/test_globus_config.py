"""`gc-agent configure --from-globus-compute` and `gc-agent delete`, through the real CLIs, a
registry that checks tokens and the shared broker; and a Globus Compute config, left as it
is, run by a real agent."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gc_client import Client, Executor, PolicyError
from gc_core.errors import Forbidden, NotAuthenticated, NotFound
from gc_core.registry import identity
from gc_core.registry.db import open_database
from gc_core.registry_api.client import RegistryClient
from tests.fabric import Endpoint, Fabric
from tests.integration.conftest import OwnRegistry
from tests.integration.test_identities import TokenFabric

CONFIGS = Path(__file__).parents[1] / "globus_compute_configs"
#: Seconds a test waits for a result.
RESULT_TIMEOUT = 60


@pytest.fixture(scope="module")
def tokens(own_registry: OwnRegistry, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[TokenFabric]:
    """A registry that checks tokens, with users alice and bob."""
    home = tmp_path_factory.mktemp("globus-home")
    db_url = f"sqlite:///{home / 'registry.db'}"
    server, broker_url = own_registry(db_url, "tokens")
    made = TokenFabric(Fabric(broker_url=broker_url, registry_url=server.url, home=home,
                              vhost=""), db_url)
    sessions = open_database(db_url)  # as `gc-registry user create` does, in this process
    with sessions() as db:
        for user in ("alice", "bob"):
            identity.create_user(db, user)
            made.tokens[user] = identity.issue_token(db, user, label="tests").token
    yield made


def _gc_agent(tokens: TokenFabric, *args: str, user: str = "alice",
              answer: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "gc-agent"), *args],
                          env=tokens.env(user), input=answer, capture_output=True, text=True,
                          timeout=120)


def _configured(tokens: TokenFabric, config: str) -> tuple[str, str]:
    """Configure an endpoint of alice's from a published config; its name and id."""
    name = f"gc-{uuid.uuid4().hex[:8]}"
    done = _gc_agent(tokens, "configure", name, "--from-globus-compute", str(CONFIGS / config))
    assert done.returncode == 0, done.stderr
    return name, done.stdout.split(":", 1)[1].split()[0]


def _registry(tokens: TokenFabric, token: str) -> RegistryClient:
    return RegistryClient(tokens.fabric.registry_url, token=token)


def test_configure_from_a_globus_compute_config_registers_and_writes_our_config(
        tokens: TokenFabric) -> None:
    name, endpoint_id = _configured(tokens, "laptop_processes.yaml")

    directory = tokens.fabric.home / "endpoints" / name
    written = yaml.safe_load((directory / "config.yaml").read_text())
    assert (written["engine"]["type"], written["engine"]["max_workers"]) == ("processes", 3)
    assert (written["description"], written["idle_heartbeats"]) == ("my workstation", 20)
    assert written["allowed_functions"] == ["3f1b2a3c-0000-4000-8000-000000000001"]
    assert (directory / "agent.token").exists()
    assert _registry(tokens, tokens.tokens["alice"]).get_endpoint(endpoint_id).description == \
        "my workstation"
    rendered = _gc_agent(tokens, "render-config", name)
    assert rendered.returncode == 0 and "heartbeat_period: 15.0" in rendered.stdout


def test_configure_from_a_cluster_config_keeps_its_provider_and_address_lookup(
        tokens: TokenFabric) -> None:
    name, _ = _configured(tokens, "polaris.yaml")

    rendered = yaml.safe_load(_gc_agent(tokens, "render-config", name).stdout)
    assert rendered["engine"]["address"] == {"type": "address_by_interface", "ifname": "lo"}
    assert rendered["engine"]["provider"]["type"] == "pbspro"
    assert rendered["engine"]["provider"]["partition"] == "preemptable"
    assert rendered["engine"]["available_accelerators"] == ["0", "1", "2", "3"]


def test_a_config_with_keys_that_cannot_be_honoured_registers_nothing(
        tokens: TokenFabric, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"log_dir": "/tmp", "engine": {
        "type": "GlobusComputeEngine", "scheduler_mode": "soft",
        "provider": {"type": "SlurmProvider", "gres": "gpu:1"}}}))
    name = f"refused-{uuid.uuid4().hex[:8]}"
    before = len(_registry(tokens, tokens.tokens["alice"]).list_endpoints())

    done = _gc_agent(tokens, "configure", name, "--from-globus-compute", str(config))

    assert done.returncode == 1
    assert done.stderr.startswith("Error: ")
    for key in ("log_dir:", "engine.scheduler_mode:", "engine.provider.gres:"):
        assert key in done.stderr
    assert len(_registry(tokens, tokens.tokens["alice"]).list_endpoints()) == before
    assert not (tokens.fabric.home / "endpoints" / name).exists()


def test_engine_options_are_refused_beside_a_globus_compute_config(tokens: TokenFabric) -> None:
    done = _gc_agent(tokens, "configure", "both", "--workers", "2", "--from-globus-compute",
                     str(CONFIGS / "laptop_threads.yaml"))

    assert done.returncode == 2 and "--from-globus-compute" in done.stderr


def test_delete_asks_first_then_unregisters_the_endpoint_and_revokes_its_agent_token(
        tokens: TokenFabric) -> None:
    name, endpoint_id = _configured(tokens, "laptop_threads.yaml")
    directory = tokens.fabric.home / "endpoints" / name
    agent_token = (directory / "agent.token").read_text().strip()
    assert _registry(tokens, agent_token).whoami().endpoint_id == endpoint_id

    declined = _gc_agent(tokens, "delete", name, answer="n\n")
    assert declined.returncode != 0 and "Aborted" in declined.stderr
    assert directory.exists()
    assert _registry(tokens, tokens.tokens["alice"]).get_endpoint(endpoint_id)

    deleted = _gc_agent(tokens, "delete", name, answer="y\n")

    assert deleted.returncode == 0, deleted.stderr
    assert "remove it from the registry" in deleted.stdout
    assert not directory.exists()
    with pytest.raises(NotFound):
        _registry(tokens, tokens.tokens["alice"]).get_endpoint(endpoint_id)
    with pytest.raises(NotAuthenticated, match="revoked"):
        _registry(tokens, agent_token).whoami()


def test_delete_of_an_endpoint_the_registry_forgot_says_so_and_removes_files_when_told(
        tokens: TokenFabric) -> None:
    name, endpoint_id = _configured(tokens, "laptop_threads.yaml")
    _registry(tokens, tokens.tokens["alice"]).delete_endpoint(endpoint_id)
    directory = tokens.fabric.home / "endpoints" / name

    refused = _gc_agent(tokens, "delete", name, "--yes")
    assert refused.returncode == 1 and "nothing was deleted" in refused.stderr
    assert f"gc-agent delete {name} --local-only" in refused.stderr
    assert directory.exists()

    done = _gc_agent(tokens, "delete", name, "--local-only", answer="y\n")

    assert done.returncode == 0, done.stderr
    assert "registry" not in done.stdout  # the question says what will happen: no registry
    assert not directory.exists()


def test_only_the_owner_may_delete_an_endpoint_not_another_user_nor_its_agent(
        tokens: TokenFabric) -> None:
    name, endpoint_id = _configured(tokens, "laptop_threads.yaml")
    agent_token = (tokens.fabric.home / "endpoints" / name / "agent.token").read_text().strip()

    with pytest.raises(NotFound):  # bob may not even see alice's private endpoint
        _registry(tokens, tokens.tokens["bob"]).delete_endpoint(endpoint_id)
    with pytest.raises(Forbidden, match="agent token cannot delete"):
        _registry(tokens, agent_token).delete_endpoint(endpoint_id)
    assert _registry(tokens, tokens.tokens["alice"]).get_endpoint(endpoint_id)

    done = _gc_agent(tokens, "delete", name, "--yes", user="bob")  # bob's token, alice's files
    assert done.returncode == 1 and "nothing was deleted" in done.stderr
    assert (tokens.fabric.home / "endpoints" / name).exists()


# -- a Globus Compute config, left as it is, run by an agent ---------------------------------


def allowed(x: int) -> int:
    return x + 1


def not_allowed(x: int) -> int:
    return x - 1


@pytest.fixture(scope="module")
def as_is_endpoint(fabric: Fabric) -> Iterator[tuple[Endpoint, str]]:
    """An endpoint whose config.yaml is a Globus Compute one (plus our name and id),
    allowing one function only; and that function's id."""
    endpoint = fabric.configure_endpoint(f"as-is-{uuid.uuid4().hex[:8]}")
    with Client(broker_url=fabric.broker_url, registry_url=fabric.registry_url,
                home=str(fabric.home)) as client:
        function_id = client.register_function(allowed)
    path = endpoint.directory / "config.yaml"
    ours = yaml.safe_load(path.read_text())
    published = yaml.safe_load((CONFIGS / "laptop_processes.yaml").read_text())
    path.write_text(yaml.safe_dump({"name": ours["name"], "endpoint_id": ours["endpoint_id"],
                                    **published, "allowed_functions": [function_id]}))
    endpoint.start()
    yield endpoint, function_id
    endpoint.stop_all()


def test_an_agent_runs_a_globus_compute_config_as_it_is_and_keeps_its_allowed_functions(
        client: Client, as_is_endpoint: tuple[Endpoint, str]) -> None:
    endpoint, _ = as_is_endpoint

    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        assert ex.submit(allowed, 41).result(timeout=RESULT_TIMEOUT) == 42
        refused = ex.submit(not_allowed, 41)
        with pytest.raises(PolicyError, match="allowed_functions"):
            refused.result(timeout=RESULT_TIMEOUT)
    assert "processes engine, 3 workers" in endpoint.read_logs()
