"""One way to run a periodic background pass: a named daemon thread that can be woken and stopped.

Every background worker of the daemon (study assembler, export queue, outbox committer, ...) is a
``step`` function run by :class:`BackgroundLoop`: ``step()`` returns how long to sleep before the next
pass (``None`` = the default interval); ``wake()`` cuts the sleep short; an exception in a pass is
logged with the loop's name and the loop goes on, so one bad pass never kills a worker silently.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from appliance.core.logs import get_logger

log = get_logger(__name__)


class BackgroundLoop:
    def __init__(
        self,
        name: str,
        step: Callable[[], float | None],
        interval_s: float,
        *,
        error_delay_s: float | None = None,
        join_timeout_s: float = 10.0,
    ):
        self.name = name
        self._step = step
        self.interval_s = interval_s
        self.error_delay_s = interval_s if error_delay_s is None else error_delay_s
        self.join_timeout_s = join_timeout_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Ask the loop to end and wait for the pass in progress (at most ``join_timeout_s``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.join_timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # a wake from now on asks for another pass
            try:
                delay = self._step()
            except Exception:
                log.exception("background pass failed; will retry", loop=self.name)
                delay = self.error_delay_s
            self._wake.wait(self.interval_s if delay is None else delay)
