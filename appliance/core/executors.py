"""Thread pools the composition root owns, and the one way code runs work on a pool it may not have.

No module creates a pool at import: the daemon's pools are made by ``appliance.app.compose`` and shut down
when the daemon stops; ``appliance infer`` makes its own for the run. Code that can use a pool takes
``pool: Executor | None`` and calls :func:`submit_or_run`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")


def submit_or_run(pool: Executor | None, fn: Callable[..., T], *args: Any) -> Future[T]:
    """``fn(*args)`` submitted to ``pool``, or run at once on this thread when ``pool`` is None.

    Either way the caller gets a ``Future``; an exception raised by ``fn`` is raised by ``Future.result()``.
    """
    if pool is not None:
        return pool.submit(fn, *args)
    fut: Future[T] = Future()
    try:
        fut.set_result(fn(*args))
    except Exception as exc:
        fut.set_exception(exc)
    return fut
