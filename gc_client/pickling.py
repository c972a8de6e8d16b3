"""What goes to the endpoint by value, and errors that say what could not be serialized.

cloudpickle pickles a function *by reference* (module and name) unless its module is
``__main__`` or registered with ``cloudpickle.register_pickle_by_value``. An endpoint can
import installed packages and the standard library, but not the user's own modules (a
``funcs.py`` next to their script): those go by value, the way Globus Compute's code
strategies send source or code instead of a name. What goes by value is followed further
(a script's function calling ``funcs``, ``funcs`` importing ``utils``), so every module of
the user's own it reaches goes by value too.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
import site
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

import cloudpickle

from gc_core.errors import SerializationError
from gc_core.registry_api.schemas import MAX_FUNCTION_BYTES
from gc_core.serialize import JSON, Serializer

__all__ = ["CapturedState", "arguments_error", "local_packages", "pickle_function", "size_text"]

#: Levels of lists, tuples and dicts searched for the part of an argument that fails.
SEARCH_DEPTH = 4
#: Items of one container tried one by one; past this the container itself is named.
SEARCH_ITEMS = 10_000

_PICKLE_ADVICE = ("Pass plain data (numbers, strings, lists, dicts, arrays), or a path or URL "
                  "the endpoint can read, and open or create the object inside the function.")
_JSON_ADVICE = ("A JSON task carries only lists, dicts with string keys, strings, finite "
                "numbers, booleans and None: convert the value, pass a path or URL the endpoint "
                "can read, or submit with the cloudpickle serializer.")


def pickle_function(function: Callable[..., Any]) -> bytes:
    """``function`` as cloudpickle bytes, with the user's own modules by value.

    Raises:
        SerializationError: the function cannot be pickled (names it and what it captures).
    """
    for name in local_packages(function):
        cloudpickle.register_pickle_by_value(sys.modules[name])
    try:
        payload: bytes = cloudpickle.dumps(function)
    except Exception as exc:
        raise _function_error(function, exc) from exc
    if len(payload) > MAX_FUNCTION_BYTES:
        raise _function_too_large(function, len(payload))
    return payload


class CapturedState:
    """What pickling a function takes along by value and the caller can rebind: the globals
    its code (and its module's functions it calls) names, and its closure cells; held as
    they were when it was pickled.

    A notebook re-runs a cell with a new parameter and submits the same function object
    again: its pickle, made with the old value, must not be reused. Checking costs a dict
    lookup and an identity test per name, against ~30 µs to pickle the function anew. The
    values are held, not their ids, so a value freed and replaced by one at the same
    address is still seen as new. A value changed in place (a list appended to) is not seen.
    """

    __slots__ = ("_cells", "_names", "_values")

    def __init__(self, function: Callable[..., Any]) -> None:
        self._names: list[tuple[dict[str, Any], str]] = []
        self._cells: list[types.CellType] = []
        target = getattr(function, "func", function)  # a partial's own arguments are fixed
        if inspect.isfunction(target) and _goes_by_value(target):
            self._follow(target, set())
        self._values = self._now()

    def changed(self) -> bool:
        """Whether a global or closure variable the function took along is bound anew."""
        return bool(self._values) and any(
            now is not then for now, then in zip(self._now(), self._values))

    def _now(self) -> tuple[Any, ...]:
        return (*(namespace.get(name, _UNBOUND) for namespace, name in self._names),
                *(_cell_contents(cell) for cell in self._cells))

    def _follow(self, function: types.FunctionType, seen: set[int]) -> None:
        """Collect ``function``'s names and cells, and those of the functions of its module
        it names (helpers defined beside it go by value with it)."""
        seen.add(id(function))
        namespace = function.__globals__
        self._cells += function.__closure__ or ()
        for name in _names_used(function.__code__):
            if name not in namespace:
                continue  # a builtin
            self._names.append((namespace, name))
            value = namespace[name]
            if inspect.isfunction(value) and value.__globals__ is namespace \
                    and id(value) not in seen:
                self._follow(value, seen)


_UNBOUND = object()


def _goes_by_value(function: types.FunctionType) -> bool:
    """Whether cloudpickle takes ``function``'s code and globals along (``__main__``, the
    user's own modules, nested functions and lambdas); otherwise the endpoint imports it
    by name and its globals are the endpoint's: nothing here can go stale."""
    module = function.__module__ or "__main__"
    return module == "__main__" or "<locals>" in function.__qualname__ \
        or function.__name__ == "<lambda>" or _is_local(module.partition(".")[0])


def _cell_contents(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # not bound yet
        return _UNBOUND


def _names_used(code: types.CodeType) -> Iterator[str]:
    """The global names ``code`` and the code nested in it (lambdas, comprehensions) use."""
    yield from code.co_names
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _names_used(constant)


def size_text(size: int) -> str:
    """``157,286,424 bytes (150.0 MiB)``."""
    return f"{size:,} bytes ({size / 2**20:.1f} MiB)"


def local_packages(function: Callable[..., Any]) -> list[str]:
    """Top-level packages ``function`` needs that an endpoint cannot be expected to import:
    imported here, but neither ``__main__``, the standard library nor an installed
    distribution. Followed through the code of ``__main__`` and of those packages, since
    cloudpickle sends that code by value and it may use more of the user's modules."""
    found: set[str] = set()
    seen: set[int] = set()
    pending: list[Any] = [function]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        module, inside = _module_and_contents(item)
        top = (module or "").partition(".")[0]
        if module is None or top == "__main__" or _is_local(top):
            found.add(top)
            pending += inside
    return sorted(found - {"", "__main__"})


def arguments_error(serializer: Serializer, args: tuple[Any, ...], kwargs: dict[str, Any],
                    error: Exception) -> SerializationError:
    """Explain why a call's arguments failed to serialize: which argument, which part of it,
    its type, the underlying error and what to do. Called only after the whole call failed."""
    named = [(f"argument {i}", value) for i, value in enumerate(args)]
    named += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
    what = "the arguments"
    for label, value in named:
        found = _find_failure(serializer, value, SEARCH_DEPTH)
        if found is not None:
            path, part, error = found
            what = f"{label} ({_type_name(value)})"
            if path:
                what += f" at {path} ({_type_name(part)})"
            break
    advice = _JSON_ADVICE if serializer is JSON else _PICKLE_ADVICE
    return SerializationError(f"cannot serialize {what} of the task with the {serializer.label} "
                              f"serializer: {_describe(error)}. {advice}")


def _function_error(function: Callable[..., Any], error: Exception) -> SerializationError:
    captured = ""
    for label, value in _captured(function):
        found = _find_failure(None, value, 0)
        if found is not None:
            captured = f", because it captures {label!r} ({_type_name(value)})"
            break
    return SerializationError(
        f"cannot serialize function {_function_name(function)} with cloudpickle "
        f"{cloudpickle.__version__}{captured}: {_describe(error)}. Define the function so it does not capture the "
        "object: create it inside the function, or pass plain data, or a path or URL the "
        "endpoint can read, as an argument.")


def _function_too_large(function: Callable[..., Any], size: int) -> SerializationError:
    """The error for a function that pickles to ``size`` bytes, over what the registry
    keeps: it names the largest thing it captures (a table, a model), which is the usual
    cause."""
    sizes = []
    for label, value in _captured(function):
        with suppress(Exception):  # what pickled whole pickles alone too; be safe anyway
            sizes.append((len(cloudpickle.dumps(value)), label, value))
    largest = max(sizes, key=lambda entry: entry[0], default=None)
    captured = "" if largest is None or largest[0] < size // 2 else (
        f": it captures {largest[1]!r} ({_type_name(largest[2])}, {size_text(largest[0])})")
    return SerializationError(
        f"function {_function_name(function)} serializes to {size_text(size)}, over the "
        f"{size_text(MAX_FUNCTION_BYTES)} a registered function may take{captured}. Pass large "
        "data as an argument (a task's arguments may take up to the broker's message size), "
        "or as a path or URL the endpoint can read, and load it inside the function.")


def _find_failure(serializer: Serializer | None, value: Any,
                  depth: int) -> tuple[str, Any, Exception] | None:
    """(path within ``value``, the part at that path, its error) of the innermost part that
    fails to serialize, or None when ``value`` serializes."""
    try:
        serializer.dumps(value) if serializer is not None else cloudpickle.dumps(value)
        return None
    except Exception as exc:  # noqa: BLE001 - a __reduce__ may raise anything; it is the answer
        failure: tuple[str, Any, Exception] = ("", value, exc)
    if depth <= 0:
        return failure
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, (list, tuple)) else ())
    for count, (key, item) in enumerate(items):
        if count >= SEARCH_ITEMS:
            break
        found = _find_failure(serializer, item, depth - 1)
        if found is not None:
            return f"[{key!r}]{found[0]}", found[1], found[2]
    return failure


def _captured(function: Callable[..., Any]) -> Iterator[tuple[str, Any]]:
    """(name, value) of what pickling ``function`` takes along: the closure and the globals
    its code uses, or a callable instance's attributes."""
    target = function
    if isinstance(function, functools.partial):
        target = function.func
        yield from ((f"args[{i}]", value) for i, value in enumerate(function.args))
        yield from function.keywords.items()
    if inspect.isfunction(target):
        found = inspect.getclosurevars(target)
        yield from found.nonlocals.items()
        yield from found.globals.items()
    elif not inspect.isroutine(target):
        yield from getattr(target, "__dict__", {}).items()


def _function_name(function: Callable[..., Any]) -> str:
    if isinstance(function, functools.partial):
        return f"functools.partial of {_function_name(function.func)}"
    if inspect.isroutine(function) or inspect.isclass(function):
        return repr(getattr(function, "__qualname__", None) or function.__name__)
    name = getattr(function, "__name__", None) or type(function).__qualname__
    return f"{name!r} (a {_type_name(function)} instance)"


def _module_and_contents(item: Any) -> tuple[str | None, list[Any]]:
    """The module ``item`` is pickled from (None: a partial, which has none of its own), and
    what its pickle takes along by value if that module goes by value: a function's globals
    and closure, a class's bases and methods. An instance counts by its class."""
    if isinstance(item, functools.partial):
        return None, [item.func, *item.args, *item.keywords.values()]
    if isinstance(item, types.ModuleType):
        return item.__name__, []
    if inspect.isfunction(item):
        return item.__module__, _used_by(item)
    if inspect.isclass(item):
        members = [getattr(v, "__func__", v) for v in vars(item).values()]
        return item.__module__, [*item.__bases__, *members]
    if inspect.isroutine(item):  # a builtin, or a bound method
        return getattr(item, "__module__", None), [getattr(item, "__func__", None),
                                                   getattr(item, "__self__", None)]
    return type(item).__module__, [type(item), *getattr(item, "__dict__", {}).values()]


def _used_by(function: types.FunctionType) -> list[Any]:
    """The globals ``function``'s code (nested code included) names, and its closure."""
    names: set[str] = set()
    codes = [function.__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    used = [function.__globals__[n] for n in names if n in function.__globals__]
    for cell in function.__closure__ or ():
        try:
            used.append(cell.cell_contents)
        except ValueError:  # a cell not yet filled
            pass
    return used


def _is_local(top: str) -> bool:
    if top not in sys.modules or top == "__main__" or top in sys.stdlib_module_names:
        return False
    # Most installed packages live in site-packages: answered without reading the metadata
    # of every distribution (a few tenths of a second), which editable installs still need.
    path = getattr(sys.modules[top], "__file__", None)
    if path and os.path.realpath(path).startswith(_site_packages()):
        return False
    return top not in _installed_packages()


@functools.cache
def _site_packages() -> tuple[str, ...]:
    return tuple(os.path.join(os.path.realpath(d), "")
                 for d in (*site.getsitepackages(), site.getusersitepackages()))


@functools.cache
def _installed_packages() -> frozenset[str]:
    """Top-level names of every installed distribution, editable installs included."""
    return frozenset(importlib.metadata.packages_distributions())


def _describe(error: BaseException) -> str:
    # gc_core.serialize wraps JSON's own error; the original says more about the value
    root = error.__cause__ if isinstance(error, SerializationError) and error.__cause__ else error
    return f"{type(root).__name__}: {root}"


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else \
        f"{kind.__module__}.{kind.__qualname__}"
