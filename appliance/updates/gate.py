"""The study gate: a model switch happens only BETWEEN studies, never while one is being analysed.

The pipeline worker holds the gate (:meth:`StudyGate.study`) for the whole of each study; the update agent
takes it exclusively (:meth:`StudyGate.switch`) to swap the active version. A waiting switch goes first: once
it asks, no new study starts until it is done, so a steady stream of studies cannot starve it, and a study
that started before the switch finishes whole on the version it started with.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SwitchTimeout(Exception):
    """The running study did not finish within the switch's wait."""


class StudyGate:
    """A readers-writer gate with writer preference: studies share it, a switch excludes them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._studies = 0
        self._switching = False
        self._waiting_switches = 0

    @contextmanager
    def study(self) -> Iterator[None]:
        """Held by the pipeline worker while it analyses one study (waits while a switch is pending)."""
        with self._cond:
            while self._switching or self._waiting_switches:
                self._cond.wait()
            self._studies += 1
        try:
            yield
        finally:
            with self._cond:
                self._studies -= 1
                self._cond.notify_all()

    @contextmanager
    def switch(self, timeout_s: float | None = None) -> Iterator[None]:
        """Held by the update agent while it swaps versions: waits for the running study to finish (raises
        :class:`SwitchTimeout` after ``timeout_s`` seconds, the studies then go on) and keeps new ones out."""
        with self._cond:
            self._waiting_switches += 1
            try:
                ok = self._cond.wait_for(lambda: self._studies == 0 and not self._switching, timeout_s)
            finally:
                self._waiting_switches -= 1
            if not ok:
                self._cond.notify_all()
                raise SwitchTimeout(f"a study was still being analysed after {timeout_s:g} s")
            self._switching = True
        try:
            yield
        finally:
            with self._cond:
                self._switching = False
                self._cond.notify_all()

    def status(self) -> dict[str, int | bool]:
        """Studies inside the gate now and whether a switch holds it (for the daemon's status)."""
        with self._cond:
            return {"studies": self._studies, "switching": self._switching, "waiting": self._waiting_switches}
