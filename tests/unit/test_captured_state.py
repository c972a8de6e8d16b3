"""gc_client.pickling.CapturedState: whether a function's pickle still holds what it would
take along now (a notebook cell run again rebinds a parameter the function uses)."""

from __future__ import annotations

import functools
from typing import Any

from gc_client.pickling import CapturedState


def _module(source: str) -> dict[str, Any]:
    """A namespace as a notebook's: functions in it go by value."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(source, namespace)
    return namespace


def test_a_global_bound_anew_is_seen_and_one_left_alone_is_not() -> None:
    notebook = _module("rate = 0.5\nlimit = 3\ndef step(x):\n    return min(x * rate, limit)\n")
    state = CapturedState(notebook["step"])
    assert not state.changed()
    notebook["limit"] = 3  # the same (cached) int
    assert not state.changed()
    notebook["rate"] = 0.25
    assert state.changed()


def test_a_value_freed_and_replaced_at_the_same_address_is_still_seen() -> None:
    notebook = _module("table = [1, 2]\ndef first():\n    return table[0]\n")
    state = CapturedState(notebook["first"])
    notebook["table"] = [9, 9]  # the old list lives on in the state, so this is a new one
    assert state.changed()


def test_a_helper_of_the_same_module_redefined_or_rebinding_its_own_globals_is_seen() -> None:
    notebook = _module("k = 2\ndef helper(x):\n    return k * x\ndef main(x):\n    return helper(x)\n")
    state = CapturedState(notebook["main"])
    notebook["k"] = 3
    assert state.changed()
    state = CapturedState(notebook["main"])
    exec("def helper(x):\n    return -x\n", notebook)
    assert state.changed()


def test_names_in_lambdas_and_comprehensions_count_and_builtins_do_not() -> None:
    notebook = _module("w = 2\ndef total(xs):\n    return sum([w * x for x in xs])\n")
    state = CapturedState(notebook["total"])
    assert not state.changed()
    notebook["w"] = 3
    assert state.changed()


def test_a_closure_variable_rebound_is_seen() -> None:
    offset = 1

    def shifted(x: int) -> int:
        return x + offset

    state = CapturedState(shifted)
    assert not state.changed()
    offset = 2
    assert state.changed()
    assert shifted(0) == offset  # (the closure really is the rebound variable)


def test_a_partial_is_followed_to_its_function() -> None:
    notebook = _module("base = 10\ndef add(a, b):\n    return base + a + b\n")
    state = CapturedState(functools.partial(notebook["add"], 1))
    notebook["base"] = 20
    assert state.changed()


def test_a_value_changed_in_place_is_not_seen() -> None:
    # Documented: only rebinding is seen; appending to a list the function took is not.
    notebook = _module("items = [1]\ndef count():\n    return len(items)\n")
    state = CapturedState(notebook["count"])
    notebook["items"].append(2)
    assert not state.changed()


def test_a_function_the_endpoint_imports_by_name_is_not_watched() -> None:
    # Its globals are the endpoint's own module's: nothing of ours to go stale, and no
    # per-submit look at a large module's names.
    import json

    assert not CapturedState(json.dumps)._values
