"""The registry: functions, endpoints and the task ledger, behind a small HTTP API."""

from gc_core.registry.app import RegistrySettings, create_app
from gc_core.registry.client import RegistryClient

__all__ = ["RegistryClient", "RegistrySettings", "create_app"]
