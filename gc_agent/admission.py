"""The agent's defence in depth: ask the registry whether this endpoint may run a task.

The broker already refuses tasks from users the endpoint's policy does not allow; this
re-check also covers function permissions, serializers and gateway rights, and keeps
holding if the broker is misconfigured. Admissions are cached for a short while so a
sweep costs one registry call per (user, function), and a policy change or a revoked
permission takes effect within ``ADMISSION_TTL``. Refusals are not cached.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

from gc_core.protocol import TaskMessage
from gc_core.registry_api.client import RegistryClient
from gc_core.registry_api.schemas import TaskCheckIn

__all__ = ["ADMISSION_TTL", "Admission", "AdmissionKey"]

#: Seconds an admission holds before the registry is asked again.
ADMISSION_TTL = 60.0


class AdmissionKey(NamedTuple):
    """What the registry's answer depends on."""

    user: str
    function_id: str
    content_type: str
    on_behalf_of: bool

    @classmethod
    def of(cls, task: TaskMessage) -> AdmissionKey:
        return cls(task.user, task.function_id, task.content_type, bool(task.on_behalf_of))


class Admission:
    """Cached answers of the registry's ``check-task`` for one endpoint."""

    def __init__(self, registry: RegistryClient, endpoint_id: str, *,
                 ttl: float = ADMISSION_TTL) -> None:
        self._registry = registry
        self._endpoint_id = endpoint_id
        self._ttl = ttl
        self._admitted: dict[AdmissionKey, float] = {}
        self._lock = threading.Lock()

    def admitted(self, task: TaskMessage) -> bool:
        """Whether ``task`` was admitted recently (no registry call)."""
        with self._lock:
            until = self._admitted.get(AdmissionKey.of(task))
        return until is not None and until > time.monotonic()

    def refusal(self, task: TaskMessage) -> str | None:
        """Ask the registry (blocking): why this endpoint must refuse ``task``, or None.

        Raises:
            RegistryError: the registry could not be asked.
        """
        answer = self._registry.check_task(self._endpoint_id, TaskCheckIn(
            user=task.user, function_id=task.function_id, content_type=task.content_type,
            on_behalf_of=task.on_behalf_of))
        if answer.allowed:
            with self._lock:
                self._admitted[AdmissionKey.of(task)] = time.monotonic() + self._ttl
            return None
        return answer.reason
