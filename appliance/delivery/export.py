"""Results to the clinic's PACS: C-STORE SCU over a durable retry queue (the ``exports`` table).

Each (object, destination) row is sent until the destination answers a success (or warning) status, then
marked done and never sent again. Failures (PACS down, association rejected, failure status) keep the row
with ``attempts`` and a ``next_attempt_at`` that backs off exponentially (retry_initial_s * 2^(n-1), capped
at retry_max_s). The queue lives in SQLite, so it survives restarts; since result UIDs are deterministic,
a resend after a crash between "stored by PACS" and "marked done" is the same instance (PACS de-duplicates).
A study moves to ``exported`` when every row of it is done.

This module is the one writer of the ``exports`` table: results queue through :func:`queue_object`, the
cloud's ``resend`` method through :func:`requeue_study`, retention through :func:`forget_study`.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE, VerificationPresentationContexts, evt

from appliance.core.audit import FAILURE, AuditEvent, record_event
from appliance.core.background import BackgroundLoop
from appliance.core.config import PacsDestination, Settings
from appliance.core.logs import get_logger
from appliance.core.store import Store, now
from appliance.lifecycle import studies
from appliance.lifecycle.studies import EXPORTED, INFERRED

log = get_logger(__name__)

SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the C-STORE warnings (stored)


def _nodelay(event: evt.Event) -> None:
    """pynetdicom does not set TCP_NODELAY; without it small PDUs wait for delayed ACKs (~40 ms each)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


HANDLERS: list[
    tuple[evt.NotificationEvent | evt.InterventionEvent, Callable[..., Any]]
    | tuple[evt.NotificationEvent | evt.InterventionEvent, Callable[..., Any], list[Any]]
] = [(evt.EVT_CONN_OPEN, _nodelay)]


def backoff(attempts: int, initial: float, maximum: float) -> float:
    """Delay before the next try after ``attempts`` failures."""
    return min(maximum, initial * (2 ** max(0, attempts - 1)))


def _ae(settings: Settings, timeout: float) -> AE:
    ae = AE(ae_title=settings.dicom.ae_title)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def echo(settings: Settings, dest: PacsDestination, timeout: float | None = None) -> tuple[bool, str]:
    """C-ECHO a destination: (ok, message)."""
    ae = _ae(settings, timeout or settings.pipeline.export_timeout_s)
    ae.add_requested_context(str(VerificationPresentationContexts[0].abstract_syntax))
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=HANDLERS)
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "no association (unreachable or aborted)"
        return False, f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): {why}"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code == 0x0000:
        return True, f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): C-ECHO success"
    return False, f"{dest.name}: C-ECHO status {code if code is None else hex(code)}"


@dataclass
class Outcome:
    export_id: int
    ok: bool
    error: str | None = None


def send(settings: Settings, dest: PacsDestination, items: list[tuple[int, Path]]) -> list[Outcome]:
    """C-STORE the files on one association; one outcome per item (all failed if no association)."""
    datasets = []
    outcomes: list[Outcome] = []
    for export_id, path in items:
        try:
            datasets.append((export_id, dcmread(path)))
        except (OSError, ValueError) as exc:
            outcomes.append(Outcome(export_id, False, f"cannot read {path}: {exc}"))
    if not datasets:
        return outcomes
    ae = _ae(settings, settings.pipeline.export_timeout_s)
    pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets})
    for sop_class, ts in pairs[:128]:
        ae.add_requested_context(sop_class, ts)
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=HANDLERS)
    except Exception as exc:  # socket errors surface in various types
        return outcomes + [Outcome(eid, False, f"association failed: {exc}") for eid, _ in datasets]
    if not assoc.is_established:
        err = "association rejected" if assoc.is_rejected else "no association (PACS unreachable or aborted)"
        return outcomes + [Outcome(eid, False, err) for eid, _ in datasets]
    try:
        for export_id, ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except Exception as exc:
                outcomes.append(Outcome(export_id, False, f"C-STORE error: {exc}"))
                continue
            code = getattr(status, "Status", None)
            if code in SUCCESS_STATUSES:
                outcomes.append(Outcome(export_id, True))
            else:
                what = "no response (aborted)" if code is None else f"C-STORE status 0x{code:04X}"
                outcomes.append(Outcome(export_id, False, what))
            if not assoc.is_established:
                break
        sent = {o.export_id for o in outcomes}
        outcomes += [Outcome(eid, False, "association lost") for eid, _ in datasets if eid not in sent]
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def mark_if_exported(conn: sqlite3.Connection, study_id: int) -> bool:
    """``inferred`` -> ``exported`` once every queued object of the study is acknowledged (in ``conn``'s
    transaction); the ``inferred`` detail (e.g. an image whose SC could not be built) is kept after it.
    A study with no destinations configured stays ``inferred``: nothing was delivered."""
    counts = conn.execute(
        "SELECT COUNT(*) AS n, SUM(state='done') AS done FROM exports WHERE study_id=?", (study_id,)
    ).fetchone()
    st = studies.get(conn, study_id)
    if counts["n"] and counts["n"] == counts["done"] and st is not None and st.state == INFERRED:
        detail = "all results acknowledged by PACS" + (f"; {st.detail}" if st.detail else "")
        studies.transition(conn, study_id, INFERRED, EXPORTED, detail)
        return True
    return False


def queue_object(
    conn: sqlite3.Connection, study_id: int, object_id: int, destinations: list[PacsDestination], at: float
) -> int:
    """Queue one result object (a ``result_objects`` row) for every destination, in the caller's
    transaction; idempotent (an object already queued for a destination is not queued again). Returns
    how many rows were added."""
    added = 0
    for dest in destinations:
        added += conn.execute(
            "INSERT OR IGNORE INTO exports(object_id, study_id, destination, next_attempt_at, created_at)"
            " VALUES (?,?,?,?,?)",
            (object_id, study_id, dest.name, at, at),
        ).rowcount
    return added


def requeue_study(conn: sqlite3.Connection, study_id: int, at: float) -> int:
    """Send every object of the study again (the cloud's ``resend``): its rows back to pending with no
    attempts, due at ``at``; an ``exported`` study goes back to ``inferred`` until they are acknowledged
    again (so retention does not purge what is being resent). Returns how many rows were re-queued."""
    n = conn.execute(
        "UPDATE exports SET state='pending', attempts=0, next_attempt_at=?, done_at=NULL, last_error=NULL"
        " WHERE study_id=?",
        (at, study_id),
    ).rowcount
    st = studies.get(conn, study_id)
    if n and st is not None and st.state == EXPORTED:
        studies.transition(conn, study_id, EXPORTED, INFERRED, f"resend requested: {n} export(s) re-queued")
    return n


def pending_count(conn: sqlite3.Connection, study_id: int) -> tuple[int, int]:
    """(rows queued, rows not yet done) for one study."""
    r = conn.execute(
        "SELECT COUNT(*) AS n, COALESCE(SUM(state!='done'), 0) AS pending FROM exports WHERE study_id=?", (study_id,)
    ).fetchone()
    return int(r["n"]), int(r["pending"])


def forget_study(conn: sqlite3.Connection, study_id: int) -> int:
    """Delete the study's export rows (retention, before its result objects go); returns how many."""
    return conn.execute(
        "DELETE FROM exports WHERE study_id=? OR object_id IN (SELECT o.id FROM result_objects o"
        " JOIN results r ON r.id=o.result_id WHERE r.study_id=?)",
        (study_id, study_id),
    ).rowcount


class Exporter:
    """The export Service: a thread that drains due rows of the queue, per destination."""

    name = "export"

    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self._loop = BackgroundLoop(
            "export", self._pass, settings.pipeline.poll_s, join_timeout_s=settings.pipeline.export_timeout_s + 5
        )
        self._passes = threading.Condition()
        self._started = 0  # passes begun
        self._finished = 0  # passes ended (numbers, in order: one thread)

    def wake(self) -> None:
        self._loop.wake()

    def send_now(self, timeout: float = 1.0) -> bool:
        """Wake the exporter and wait (at most ``timeout``) until a pass that began after this call is over,
        i.e. until what was committed before it has been tried. Lets the worker hold back CPU-heavy work
        (SC rendering: Python threads contend for the GIL and slow the exporter's socket I/O several-fold)
        while the SR goes out. False on timeout (PACS slow or down): the caller just carries on."""
        with self._passes:
            target = self._started + 1
        self._loop.wake()
        with self._passes:
            return self._passes.wait_for(lambda: self._finished >= target, timeout)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def _pass(self) -> float:
        with self._passes:
            self._started += 1
            number = self._started
        try:
            self.run_once()
        except Exception:
            log.exception("export pass failed")
        finally:
            with self._passes:
                self._finished = number
                self._passes.notify_all()
        return self._sleep_s()

    def _sleep_s(self) -> float:
        row = self.store.query("SELECT MIN(next_attempt_at) AS t FROM exports WHERE state='pending'")
        nxt = row[0]["t"] if row else None
        poll = self.settings.pipeline.poll_s
        return poll if nxt is None else max(0.05, min(poll, nxt - now()))

    def run_once(self, at: float | None = None) -> int:
        """Send every due row once; returns how many were delivered."""
        at = now() if at is None else at
        dests = {d.name: d for d in self.settings.pipeline.destinations}
        rows = self.store.query(
            "SELECT e.id, e.destination, e.attempts, e.study_id, o.path FROM exports e"
            " JOIN result_objects o ON o.id = e.object_id"
            " WHERE e.state='pending' AND e.next_attempt_at <= ? ORDER BY e.id",
            (at,),
        )
        delivered = 0
        by_dest: dict[str, list] = {}
        for r in rows:
            by_dest.setdefault(r["destination"], []).append(r)
        for name, items in by_dest.items():
            dest = dests.get(name)
            if dest is None:  # destination removed from config: keep the rows, try again later
                self._record(items, [Outcome(r["id"], False, "destination not configured") for r in items])
                continue
            batch = self.settings.pipeline.export_batch
            for i in range(0, len(items), batch):
                chunk = items[i : i + batch]
                outcomes = send(self.settings, dest, [(r["id"], Path(r["path"])) for r in chunk])
                self._record(chunk, outcomes)
                delivered += sum(o.ok for o in outcomes)
        return delivered

    def _record(self, rows: list, outcomes: list[Outcome]) -> None:
        attempts = {r["id"]: r["attempts"] for r in rows}
        study_of = {r["id"]: r["study_id"] for r in rows}
        p = self.settings.pipeline
        ts = now()
        with self.store.transaction() as conn:
            for o in outcomes:
                if o.ok:
                    conn.execute(
                        "UPDATE exports SET state='done', done_at=?, attempts=attempts+1, last_error=NULL WHERE id=?",
                        (ts, o.export_id),
                    )
                else:
                    n = attempts[o.export_id] + 1
                    conn.execute(
                        "UPDATE exports SET attempts=?, next_attempt_at=?, last_error=? WHERE id=?",
                        (n, ts + backoff(n, p.retry_initial_s, p.retry_max_s), o.error, o.export_id),
                    )
            for study_id in {study_of[o.export_id] for o in outcomes}:
                _audit_export(self.store, rows, outcomes, study_id, mark_if_exported(conn, study_id))
        for o in outcomes:
            if o.ok:
                log.info("result exported", export_id=o.export_id, study_id=study_of[o.export_id])
            else:
                log.warning(
                    "export failed, will retry",
                    export_id=o.export_id,
                    error=o.error,
                    attempts=attempts[o.export_id] + 1,
                )


def _audit_export(store: Store, rows: list, outcomes: list[Outcome], study_id: int, exported: bool) -> None:
    """One audit entry per study export (in the caller's transaction; ``rows`` are one destination's):
    ``success`` when the study has just become ``exported``, ``failure`` when objects of it failed their
    first try (retries are not audited again)."""
    dest = rows[0]["destination"]
    first_try = {r["id"] for r in rows if r["study_id"] == study_id and not r["attempts"]}
    failed = [o for o in outcomes if o.export_id in first_try and not o.ok]
    if exported:
        record_event(store, AuditEvent.EXPORT, actor="system", subject=str(study_id), detail={"destination": dest})
    elif failed:
        detail = {"destination": dest, "objects": len(failed), "error": failed[0].error}
        record_event(store, AuditEvent.EXPORT, actor="system", outcome=FAILURE, subject=str(study_id), detail=detail)
