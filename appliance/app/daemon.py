"""The daemon: runs what :func:`appliance.app.compose.compose` made until SIGTERM/SIGINT.

Services start in the composed order and stop in reverse, so the DICOM SCP stops accepting and drains its
associations before anything it feeds goes away. While running, ``<state_dir>/run/status.json`` says the pid, the
start time, when it was last refreshed (every few seconds) and each service's status (e.g. the SCP's actual
listening address, the cloud connection), for ``appliance status``.
One daemon per state directory: ``<state_dir>/run/appliance.lock`` (flock) is held for the process's
life, and a second ``appliance run`` on the same directory exits 1 before touching anything.

Under systemd (``Type=notify``, ``systemd/appliance.service``) the daemon tells the service manager
``READY=1`` once every service started, ``STOPPING=1`` when it begins to stop, and, when the unit sets
``WatchdogSec=``, ``WATCHDOG=1`` from the main loop every quarter period *only while* the services' health
checks pass (``Appliance.health_problem``: the DICOM listener accepting, ``state.db`` writable); a failing
check stops the pings and systemd restarts the daemon once the period runs out. Without
``NOTIFY_SOCKET`` all of this is a no-op (``sdnotify``).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sdnotify

from appliance import __version__
from appliance.app.compose import Appliance, Service, compose
from appliance.core.audit import FAILURE, SUCCESS, AuditEvent, record_event
from appliance.core.config import Settings
from appliance.core.logs import configure, get_logger
from appliance.core.store import Store

log = get_logger(__name__)


def status_path(settings: Settings) -> Path:
    return settings.state_dir / "run" / "status.json"


class AlreadyRunning(Exception):
    """Another ``appliance run`` holds this state directory."""

    def __init__(self, pid: str):
        self.pid = pid
        super().__init__(f"another appliance (pid {pid or 'unknown'}) is running on this state directory")


def hold_state_dir(settings: Settings) -> int:
    """Take the state directory for this process (``run/appliance.lock``, flock; released when the
    process ends, however it ends); returns the lock's fd. Two daemons on one state directory would
    each sweep and recover the other's in-flight files at startup, so the second one must not start."""
    path = settings.state_dir / "run" / "appliance.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise AlreadyRunning(holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def read_status(settings: Settings) -> dict[str, Any] | None:
    """The running daemon's status file, or None when no live daemon wrote one."""
    path = status_path(settings)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pid = int(doc.get("pid", 0))
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return doc


STATUS_REFRESH_S = 5.0  # status.json is rewritten this often while running (cloud connection, queues move)


def _write_status(settings: Settings, app: Appliance, started_at: float) -> None:
    doc = {"pid": os.getpid(), "started_at": started_at, "updated_at": time.time(), "services": app.status_doc()}
    path = status_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: a quarter of systemd's ``WATCHDOG_USEC`` (sd_watchdog_enabled
    advises at most half; a quarter lets one slow or transiently failing health check pass without a
    restart: only about three failing in a row let the period run out), or None when the service
    manager asked for none (unset, 0, not a number, or ``WATCHDOG_PID`` names another process)."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 4e6 if usec > 0 else None


class Watchdog:
    """Pings the service manager's watchdog while ``check`` (None = healthy, else the problem) passes.

    ``tick`` is called from the main loop; it runs the check and pings at most once per ``interval``
    seconds. A failed check is logged once (and each recovery), and shown as the unit's STATUS=.
    """

    def __init__(self, notifier: sdnotify.SystemdNotifier, interval: float, check: Callable[[], str | None]):
        self.notifier, self.interval, self.check = notifier, interval, check
        self._next = 0.0
        self._problem: str | None = None

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        try:
            problem = self.check()
        except Exception as exc:  # a check that crashes is a failed check
            problem = f"health check failed: {type(exc).__name__}: {exc}"
        if problem is None:
            if self._problem is not None:
                log.info("health check passes again; watchdog pings resumed")
                self.notifier.notify("STATUS=running")
            self._problem = None
            self.notifier.notify("WATCHDOG=1")
            return
        if problem != self._problem:
            log.error("health check failed; watchdog pings stopped", problem=problem)
            self.notifier.notify(f"STATUS=unhealthy: {problem}")
        self._problem = problem


UMASK = 0o027  # files 0640 / folders 0750 at most: the service user and its group


def run(settings: Settings) -> int:
    """Run in the foreground until SIGTERM/SIGINT; 0 on a clean stop, 1 if a service failed to start."""
    os.umask(UMASK)  # whatever started us: nothing the daemon creates is world-readable (patient data, secrets)
    configure(settings.log.level, settings.log.format)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock_fd = hold_state_dir(settings)
    except AlreadyRunning as exc:
        log.error(
            "not started: another appliance is running on this state directory",
            state_dir=str(settings.state_dir),
            pid=exc.pid,
        )
        return 1
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    notifier = sdnotify.SystemdNotifier()  # no-op without NOTIFY_SOCKET
    store = Store(settings.db_path)
    app = compose(settings, store)
    started: list[Service] = []
    rc = 0
    try:
        for service in app.services:
            service.start()
            started.append(service)
        started_at = time.time()
        _write_status(settings, app, started_at)  # first: start_daemon and `appliance status` wait for it
        record_event(
            store, AuditEvent.APPLIANCE_STARTED, actor="system", detail={"pid": os.getpid(), "version": __version__}
        )
        log.info("appliance running", pid=os.getpid(), state_dir=str(settings.state_dir))
        notifier.notify("READY=1\nSTATUS=running")
        interval = watchdog_interval()
        watchdog = Watchdog(notifier, interval, app.health_problem) if interval else None
        tick = min(0.5, interval) if interval else 0.5
        refreshed = time.monotonic()
        while True:
            if watchdog is not None:
                watchdog.tick()
            if stop.wait(tick):
                break
            if time.monotonic() - refreshed >= STATUS_REFRESH_S:
                refreshed = time.monotonic()
                try:
                    _write_status(settings, app, started_at)
                except Exception:  # a status file that cannot be written must not stop the appliance
                    log.exception("status.json not refreshed")
    except Exception as exc:
        log.exception("service failed to start", error=str(exc))
        rc = 1
    finally:
        notifier.notify("STOPPING=1")
        for service in reversed(started):
            try:
                service.stop()
            except Exception:
                log.exception("service failed to stop cleanly", service=service.name)
                rc = rc or 1
        status_path(settings).unlink(missing_ok=True)
        record_event(
            store, AuditEvent.APPLIANCE_STOPPED, actor="system", outcome=FAILURE if rc else SUCCESS, detail={"rc": rc}
        )
        store.close()
    log.info("appliance stopped", rc=rc)
    os.close(lock_fd)
    return rc
