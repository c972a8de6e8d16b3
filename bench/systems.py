"""The systems ``python -m bench.run`` knows, registered in one list, in run order.

To add a system, implement ``bench.harness.System`` (``name``, ``start()``, ``stop()``,
``run_throughput(n)``, ``run_latency(n)``, ``processes()``) and add one line to ``SYSTEMS``. For gc-fabric,
once ``bench/gc_fabric.py`` defines, say, ``GcFabricExecutorSystem`` with
``name = "gc-fabric-executor"``::

    SystemSpec("gc-fabric-executor", "bench.gc_fabric:GcFabricExecutorSystem"),

Keyword arguments for the constructor go in ``kwargs``. Each class is imported only when its
system is built, so a system whose module or library is broken shows up as an error row in
the table instead of stopping the run.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bench.harness import System


@dataclass(frozen=True)
class SystemSpec:
    """How to build one system: its name, ``"module:Class"`` and constructor keywords."""

    name: str
    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> System:
        """Import the class and construct the system.

        Raises:
            ImportError: if the module or class cannot be imported.
            ValueError: if the built system's ``name`` differs from the registered one.
        """
        module_name, _, class_name = self.target.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        system: System = cls(**self.kwargs)
        if system.name != self.name:
            raise ValueError(f"{self.target} is named {system.name!r}, registered as {self.name!r}")
        return system


#: Worker counts at which the htex engine is measured beside Parsl's own HTEX.
HTEX_WORKERS = (1, 2, 4)
#: Simulated htex workers (``bench.sim_pool``): the many behind one agent, and the reference.
SIMULATED_WORKERS = (64, 1000)
#: Rows compared pairwise in RESULTS.md: ours, then the system it wraps.
PAIRS = [(f"gc-fabric-htex-{w}w", f"parsl-htex-{w}w") for w in HTEX_WORKERS]

#: Every system the CLI can run, in the order it runs them.
SYSTEMS: list[SystemSpec] = [
    SystemSpec("raw-amqp-reliable", "bench.peers.raw_amqp:RawAmqpSystem", {"reliable": True}),
    SystemSpec("raw-amqp-transient", "bench.peers.raw_amqp:RawAmqpSystem", {"reliable": False}),
    SystemSpec("raw-amqp-quorum", "bench.peers.raw_amqp:RawAmqpSystem",
               {"reliable": True, "quorum": True}),
    SystemSpec("celery-threads", "bench.peers.celery_peer:CelerySystem", {"pool": "threads"}),
    SystemSpec("celery-prefork", "bench.peers.celery_peer:CelerySystem", {"pool": "prefork"}),
    SystemSpec("parsl-htex", "bench.peers.parsl_htex:ParslHtexSystem"),
    SystemSpec("dramatiq", "bench.peers.dramatiq_peer:DramatiqSystem"),
    SystemSpec("gc-fabric-threads", "bench.gc_fabric:GcFabricSystem", {"engine": "threads"}),
    SystemSpec("gc-fabric-processes", "bench.gc_fabric:GcFabricSystem", {"engine": "processes"}),
    SystemSpec("gc-fabric-processes-no-ledger", "bench.gc_fabric:GcFabricSystem",
               {"engine": "processes", "ledger": False}),
    *(spec for workers in HTEX_WORKERS for spec in (
        SystemSpec(f"parsl-htex-{workers}w", "bench.peers.parsl_htex:ParslHtexSystem",
                   {"workers": workers, "encrypted": True}),
        SystemSpec(f"gc-fabric-htex-{workers}w", "bench.gc_fabric:GcFabricSystem",
                   {"engine": "htex", "workers": workers}))),
    *(SystemSpec(f"gc-fabric-htex-sim-{workers}w", "bench.gc_fabric:GcFabricSystem",
                 {"engine": "htex", "workers": workers, "simulated": True})
      for workers in SIMULATED_WORKERS),
]


def select_systems(names: str | None) -> list[SystemSpec]:
    """Return the specs named in a comma list (all of SYSTEMS if ``names`` is empty).

    Raises:
        KeyError: if a name is not registered.
    """
    if not names:
        return list(SYSTEMS)
    by_name = {spec.name: spec for spec in SYSTEMS}
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise KeyError(f"unknown systems {unknown}; registered: {sorted(by_name)}")
    return [by_name[name] for name in wanted]
