"""Progress bars come from tqdm.auto, so a notebook shows a widget and a terminal text."""

from __future__ import annotations

from concurrent.futures import Future

import tqdm.auto
import tqdm.std

from gc_client import as_completed


def test_as_completed_shows_a_tqdm_auto_bar_counting_each_future() -> None:
    futures: list[Future[int]] = [Future() for _ in range(3)]
    for value, future in enumerate(futures):
        future.set_result(value)
    seen: list[type] = []

    for _future in as_completed(futures, description="sweep"):
        seen += [type(bar) for bar in tqdm.std.tqdm._instances]

    # tqdm.auto's class outside a notebook is its asyncio one, not plain tqdm
    assert tqdm.auto.tqdm is not tqdm.std.tqdm
    assert seen and set(seen) == {tqdm.auto.tqdm}


def test_the_bar_can_be_switched_off() -> None:
    future: Future[int] = Future()
    future.set_result(1)
    before = len(tqdm.std.tqdm._instances)

    shown = [len(tqdm.std.tqdm._instances) for _ in as_completed([future], progress=False)]

    assert shown == [before]  # a disabled bar is never registered


def test_the_executor_maps_with_the_same_bar() -> None:
    from gc_client import executor, progress

    assert executor.tqdm is progress.tqdm is tqdm.auto.tqdm
