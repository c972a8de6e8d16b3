"""Functions from the user's own modules run on an endpoint that cannot import those modules;
functions from installed packages and the standard library still go by reference."""

from __future__ import annotations

import base64
import importlib
import importlib.util
import math
import os
import pickletools
import runpy
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import cloudpickle
import pytest

from gc_client import Client, Executor, ShellFunction
from tests.fabric import Endpoint

#: A module of the user's own: a function that calls a helper and reads a constant, one that
#: uses a second module of the user's own, and a class whose instances travel as arguments.
LAB_MODULE = textwrap.dedent('''
    import {helpers} as helpers

    SCALE = 7

    class Point:
        def __init__(self, x, y):
            self.x = x
            self.y = y

    def _offset(x):
        return x + 1

    def scaled(x):
        return _offset(x) * SCALE

    def doubled(x):
        return helpers.double(scaled(x))

    def norm1(point):
        return abs(point.x) + abs(point.y)
''')
#: The second module of the user's own.
LAB_HELPERS = "def double(x):\n    return 2 * x\n"
#: A script of the user's: its functions live in ``__main__`` and call into their module.
LAB_SCRIPT = "from {funcs} import scaled\n\ndef main_task(x):\n    return scaled(x) + 1\n"


@pytest.fixture
def lab_module(tmp_path: Path) -> Iterator[ModuleType]:
    """``labfuncs_<random>`` (importing ``labhelpers_<random>``), importable in this process
    only: their dir is on sys.path here, never on the agent's PYTHONPATH."""
    suffix = uuid.uuid4().hex[:8]
    funcs, helpers = f"labfuncs_{suffix}", f"labhelpers_{suffix}"
    (tmp_path / f"{helpers}.py").write_text(LAB_HELPERS)
    (tmp_path / f"{funcs}.py").write_text(LAB_MODULE.format(helpers=helpers))
    assert str(tmp_path) not in os.environ.get("PYTHONPATH", "")
    assert not Path.cwd().is_relative_to(tmp_path)  # the agent starts in our cwd
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(funcs)
    finally:
        for name in (funcs, helpers):
            if name in cloudpickle.list_registry_pickle_by_value():
                cloudpickle.unregister_pickle_by_value(sys.modules[name])
            sys.modules.pop(name, None)
        sys.path.remove(str(tmp_path))


def pickled_strings(payload: bytes) -> set[str]:
    """Every string a pickle pushes: module and attribute names of what it refers to."""
    return {arg for _op, arg, _pos in pickletools.genops(payload) if isinstance(arg, str)}


def stored_payload(client: Client, function_id: str) -> bytes:
    """The function's bytes as the registry holds them (what the endpoint will load)."""
    return base64.b64decode(client.registry.get_function(function_id).payload_b64)


def test_a_function_from_a_local_module_runs_on_an_endpoint_that_cannot_import_it(
        client: Client, endpoint: Endpoint, lab_module: ModuleType) -> None:
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        # Given an endpoint that cannot import the module
        assert ex.submit(importlib.util.find_spec, lab_module.__name__).result(60) is None
        # When a function from it is submitted, Then it runs with its helper and constant
        assert ex.submit(lab_module.scaled, 5).result(timeout=60) == 42


def test_a_local_function_using_another_local_module_runs_on_the_endpoint(
        client: Client, endpoint: Endpoint, lab_module: ModuleType) -> None:
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        assert ex.submit(lab_module.doubled, 5).result(timeout=60) == 84


def test_a_script_s_function_calling_into_a_local_module_runs_on_the_endpoint(
        client: Client, endpoint: Endpoint, lab_module: ModuleType) -> None:
    # Given a function defined in the user's script (module __main__) that calls their module
    path = Path(str(lab_module.__file__)).with_name("lab_script.py")
    path.write_text(LAB_SCRIPT.format(funcs=lab_module.__name__))
    script = runpy.run_path(str(path), run_name="__main__")
    assert script["main_task"].__module__ == "__main__"
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        assert ex.submit(script["main_task"], 5).result(timeout=60) == 43


def test_an_instance_of_a_local_class_travels_as_an_argument(
        client: Client, endpoint: Endpoint, lab_module: ModuleType) -> None:
    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        assert ex.submit(lab_module.norm1, lab_module.Point(3, -4)).result(timeout=60) == 7


def test_a_local_function_is_stored_by_value(client: Client, lab_module: ModuleType) -> None:
    strings = pickled_strings(stored_payload(client, client.register_function(lab_module.scaled)))

    assert "cloudpickle.cloudpickle" in strings  # rebuilt from its code by cloudpickle
    assert "SCALE" in strings and "_offset" in strings


def test_a_stdlib_function_is_stored_by_reference(client: Client) -> None:
    payload = stored_payload(client, client.register_function(math.factorial))

    assert {"math", "factorial"} <= pickled_strings(payload)
    assert not any(s.startswith("cloudpickle") for s in pickled_strings(payload))
    assert len(payload) < 100


def test_an_installed_package_s_callable_is_stored_by_reference(client: Client) -> None:
    # gc_client is installed editable (pip install -e): still a distribution, by reference
    strings = pickled_strings(stored_payload(
        client, client.register_function(ShellFunction("echo {word}", walltime=5))))

    assert {"gc_client.functions", "ShellFunction"} <= strings
    assert not any(s.startswith("cloudpickle") for s in strings)
