"""The public API of each package is its ``__all__``, pinned here (like httpx's test)."""

from __future__ import annotations

import importlib
import types

import pytest

import gc_agent
import gc_client
import gc_core

PINNED = {
    "gc_core": [
        # errors
        "BrokerError", "BrokerUnreachable", "ConfigError", "ConnectionLost", "GCError",
        "NotFound", "PolicyError", "ProtocolError", "PublishNotConfirmed", "RegistryError",
        "SerializationError", "SerializerNotAllowed", "TaskCancelled", "TaskDeadLettered",
        "TaskError", "TaskExecutionFailed", "TaskPending", "UnknownSerializer",
        "VersionMismatch", "WorkerLost", "TaskNotFound", "ResultTooLarge", "WorkerError",
        "EndpointError", "ResultNotSerializable",
        # wire models
        "ErrorInfo", "ResultMessage", "TaskMessage", "Timings",
        # settings
        "FabricSettings", "resolve_settings",
    ],
    "gc_client": [
        "AsyncExecutor", "Client", "Executor",
        "MPIFunction", "ShellFunction", "ShellResult",
        "Batch", "ComputeFuture", "as_completed",
        "EndpointError", "GCError", "PolicyError", "PublishNotConfirmed",
        "ResultNotSerializable", "ResultTooLarge", "SerializationError", "TaskCancelled",
        "TaskDeadLettered", "TaskError", "TaskExecutionFailed", "TaskNotFound", "TaskPending",
        "WorkerLost",
    ],
    "gc_agent": ["Agent", "EndpointConfig", "EngineConfig", "load_config"],
}

PACKAGES = [gc_core, gc_client, gc_agent]

#: Modules whose ``__all__`` must name only things that exist.
MODULES = [
    "gc_core.errors", "gc_core.protocol", "gc_core.serialize", "gc_core.settings",
    "gc_core.topology", "gc_core.registry", "gc_core.registry.store", "gc_core.registry.db",
    "gc_core.registry_api", "gc_core.registry_api.schemas",
    "gc_core.registry_api.client", "gc_agent.config", "gc_agent.policy", "gc_agent.execution",
    "gc_client.tasks", "gc_client.async_executor", "gc_core.broker_async",
    "gc_client.taskgroup", "gc_client.executor", "gc_core.cli", "gc_core.broker",
    "gc_core.broker_consumers", "gc_core.broker_errors", "gc_core.broker_hardening",
    "gc_core.broker_limits", "gc_core.broker_login", "gc_core.broker_publisher",
]


def _public_names(package: types.ModuleType) -> set[str]:
    """What a package offers: public attributes that are not its own submodules."""
    return {name for name, value in vars(package).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)}


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_name_in_all_exists(package: types.ModuleType) -> None:
    missing = [name for name in package.__all__ if not hasattr(package, name)]

    assert missing == []


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_all_is_exactly_what_the_package_exports(package: types.ModuleType) -> None:
    assert set(package.__all__) == _public_names(package)


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_all_lists_each_name_once(package: types.ModuleType) -> None:
    assert len(package.__all__) == len(set(package.__all__))


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_the_public_api_is_the_pinned_list(package: types.ModuleType) -> None:
    assert package.__all__ == PINNED[package.__name__]


@pytest.mark.parametrize("module_name", MODULES)
def test_every_name_in_a_modules_all_exists(module_name: str) -> None:
    module = importlib.import_module(module_name)

    assert [name for name in module.__all__ if not hasattr(module, name)] == []


def test_every_error_exported_derives_from_gc_error() -> None:
    for package in PACKAGES:
        for name in package.__all__:
            value = getattr(package, name)
            if isinstance(value, type) and issubclass(value, BaseException):
                assert issubclass(value, gc_core.GCError), f"{package.__name__}.{name}"
