"""Progress bars over batches of futures (tqdm).

Bars come from ``tqdm.auto``: a widget in a Jupyter notebook (with ipywidgets), text in a
terminal. The Executor's ``map(progress=True)`` uses the same.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar, cast

from tqdm.auto import tqdm

__all__ = ["as_completed"]

_F = TypeVar("_F", bound=Future[Any])


def as_completed(futures: Iterable[_F], *, timeout: float | None = None, progress: bool = True,
                 description: str = "tasks") -> Iterator[_F]:
    """Yield futures as they finish, like ``concurrent.futures.as_completed``, with a bar.

    Example:
        >>> for future in as_completed([ex.submit(simulate, s) for s in seeds]):
        ...     record(future.result())
    """
    pending = list(futures)
    with tqdm(total=len(pending), desc=description, unit="task", disable=not progress) as bar:
        for future in concurrent.futures.as_completed(pending, timeout=timeout):
            bar.update(1)
            yield cast(_F, future)
