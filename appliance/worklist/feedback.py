"""Radiologists' feedback on results: a verdict on each finding and the study's confirmed outcome.

This module is the one writer of the ``feedback`` table (migration 0014). A dashboard user (viewer role and
above) marks a finding of a bundle's newest result ``agree`` / ``disagree`` / ``uncertain``, or records the
study's confirmed outcome (a code of ``[feedback] outcomes``: biopsy, GeneXpert, culture, follow-up) once known.
Each is a row with who (user name and role) and when; changing one's verdict is allowed and is a new row with
the next revision (the history stays; the newest revision of each (result, kind, label) is in force).

The row, its audit entry (``feedback``, subject the study's pseudonym or id, no PHI) and, when the result was
sent to the central team, its de-identified ``feedback`` message (result ``mid`` + study pseudonym, never names
or UIDs, :mod:`appliance.cloud.feedback_messages`) commit in one transaction, or none of them does. The message
is encrypted before that transaction (crypto never holds the write lock); when another revision won the race
meanwhile, it is built again with the next revision.

Refusals raise :class:`FeedbackRefused` (``status`` 409: the study was purged by retention, it has no result of
that bundle; 400: an unknown label, verdict or outcome code); nothing is written.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

from appliance.core.audit import AuditEvent, record_event
from appliance.core.config import Settings
from appliance.core.logs import get_logger
from appliance.core.store import Store
from appliance.lifecycle import studies
from appliance.worklist.read import StudyNotFound

log = get_logger(__name__)

VERDICTS = ("agree", "disagree", "uncertain")
Kind = Literal["finding", "outcome"]
MAX_TRIES = 3  # building a message again when another revision was recorded meanwhile


class FeedbackRefused(ValueError):
    """Feedback that cannot be recorded; ``status`` is the HTTP status a client should see (400 or 409)."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


class FeedbackPublisher(Protocol):
    """Port: where feedback goes besides this box (the cloud outbox; None on a box without cloud sync)."""

    def build(self, feedback: dict[str, Any]) -> tuple[str, bytes]: ...

    def enqueue(self, conn: sqlite3.Connection, message_id: str, body: bytes) -> bool: ...

    def committed(self) -> None: ...


@dataclass(frozen=True)
class FeedbackEntry:
    """One recorded feedback revision. ``given_at``: seconds since the epoch; ``message_id``: the ``feedback``
    message queued for the central team (None: kept on this box only, the result was never sent there)."""

    id: int
    study_id: int
    bundle_id: str
    bundle_version: str
    kind: str
    label: str | None
    verdict: str | None
    outcome_code: str | None
    outcome_positive: bool | None
    revision: int
    actor: str
    role: str
    given_at: float
    message_id: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return asdict(self)


def _entry(r: sqlite3.Row) -> FeedbackEntry:
    return FeedbackEntry(
        id=int(r["id"]),
        study_id=int(r["study_id"]),
        bundle_id=r["bundle_id"],
        bundle_version=r["bundle_version"],
        kind=r["kind"],
        label=r["label"] or None,
        verdict=r["verdict"],
        outcome_code=r["outcome_code"],
        outcome_positive=None if r["outcome_positive"] is None else bool(r["outcome_positive"]),
        revision=int(r["revision"]),
        actor=r["actor"],
        role=r["role"],
        given_at=float(r["given_at"]),
        message_id=r["message_id"],
    )


def history(store: Store, study_id: int) -> list[FeedbackEntry]:
    """Every feedback revision given on the study, oldest first."""
    rows = store.query("SELECT * FROM feedback WHERE study_id=? ORDER BY id", (study_id,))
    return [_entry(r) for r in rows]


def current(store: Store, study_id: int) -> list[FeedbackEntry]:
    """The feedback in force on the study: the newest revision of each (result, kind, label), oldest first."""
    rows = store.query(
        "SELECT f.* FROM feedback f WHERE f.study_id=? AND f.revision = (SELECT MAX(g.revision) FROM feedback g"
        " WHERE g.result_id=f.result_id AND g.kind=f.kind AND g.label=f.label) ORDER BY f.id",
        (study_id,),
    )
    return [_entry(r) for r in rows]


@dataclass(frozen=True)
class _Target:
    result_id: int
    bundle_id: str
    bundle_version: str
    result_mid: str | None
    pseudonym: str | None


def _targets(conn: sqlite3.Connection, study_id: int, bundle_id: str | None) -> list[_Target]:
    """The newest result of each bundle of the study (of ``bundle_id`` only when given)."""
    out: dict[str, _Target] = {}
    for r in conn.execute(
        "SELECT id, bundle_id, bundle_version, summary FROM results WHERE study_id=? ORDER BY id", (study_id,)
    ):
        if bundle_id is not None and r["bundle_id"] != bundle_id:
            continue
        try:
            summary = json.loads(r["summary"] or "{}")
        except ValueError:
            summary = {}
        cloud = summary.get("cloud") or {}
        out[r["bundle_id"]] = _Target(
            int(r["id"]), r["bundle_id"], r["bundle_version"], cloud.get("message_id"), cloud.get("pseudonym")
        )
    return list(out.values())


def _labels(conn: sqlite3.Connection, result_id: int) -> set[str]:
    row = conn.execute("SELECT summary FROM results WHERE id=?", (result_id,)).fetchone()
    try:
        summary = json.loads(row["summary"] or "{}") if row else {}
    except ValueError:
        return set()
    return {str(f.get("label")) for f in summary.get("findings") or [] if f.get("label")}


def _check_study(conn: sqlite3.Connection, study_id: int) -> None:
    st = studies.get(conn, study_id)
    if st is None:
        raise StudyNotFound(f"no study with id {study_id}")
    if st.state == studies.PURGED:
        raise FeedbackRefused(
            f"study {study_id} is no longer held on this box (purged by retention): its feedback cannot be recorded"
        )


def _next_revision(conn: sqlite3.Connection, result_id: int, kind: str, label: str) -> int:
    row = conn.execute(
        "SELECT MAX(revision) FROM feedback WHERE result_id=? AND kind=? AND label=?", (result_id, kind, label)
    ).fetchone()
    return int(row[0] or 0) + 1


def record(
    store: Store,
    settings: Settings,
    study_id: int,
    *,
    kind: Kind,
    actor: str,
    role: str,
    bundle_id: str | None = None,
    label: str | None = None,
    verdict: str | None = None,
    outcome_code: str | None = None,
    publisher: FeedbackPublisher | None = None,
    source_ip: str | None = None,
) -> list[FeedbackEntry]:
    """Record one feedback and return the rows written.

    ``kind="finding"``: ``verdict`` (agree | disagree | uncertain) on ``label`` of the newest result of
    ``bundle_id``; one row. ``kind="outcome"``: ``outcome_code`` (one of ``settings.feedback.outcomes``) on the
    study; one row per bundle's newest result (``bundle_id`` narrows it to one). ``actor``/``role``: the dashboard
    user and role (viewer, technician, admin). Each row is audited (``feedback``) and, when its result was sent
    to the central team and ``publisher`` is given, queued as a ``feedback`` message, all in one transaction.

    Raises :class:`~appliance.worklist.read.StudyNotFound` (unknown id), :class:`FeedbackRefused` (409: purged,
    no result; 400: unknown verdict, label or outcome code), ``ValueError``/``OSError`` when the message cannot
    be built; nothing is written then.
    """
    outcome_positive: bool | None = None
    if kind == "finding":
        if verdict not in VERDICTS:
            raise FeedbackRefused(f"verdict must be one of {', '.join(VERDICTS)}", 400)
        if not bundle_id or not label:
            raise FeedbackRefused("a finding's feedback names its bundle and label", 400)
    elif kind == "outcome":
        code = settings.feedback.outcome(outcome_code or "")
        if code is None:
            known = ", ".join(o.code for o in settings.feedback.outcomes)
            raise FeedbackRefused(f"unknown outcome code {str(outcome_code)[:64]!r}; configured: {known}", 400)
        outcome_positive, verdict, label = code.positive, None, None
    else:
        raise FeedbackRefused(f"kind must be 'finding' or 'outcome', not {str(kind)[:20]!r}", 400)

    for _attempt in range(MAX_TRIES):
        conn = store.conn
        _check_study(conn, study_id)
        targets = _targets(conn, study_id, bundle_id)
        if not targets:
            what = f"no result of bundle {bundle_id}" if bundle_id else "no result"
            raise FeedbackRefused(f"study {study_id} has {what} to give feedback on")
        if kind == "finding" and label not in _labels(conn, targets[0].result_id):
            raise FeedbackRefused(f"the {bundle_id} result of study {study_id} has no finding {label!r}", 400)
        given_at = time.time()
        day = datetime.fromtimestamp(given_at, timezone.utc).date()
        planned = []
        for t in targets:
            revision = _next_revision(conn, t.result_id, kind, label or "")
            message: tuple[str, bytes] | None = None
            if publisher is not None and t.result_mid and t.pseudonym:
                message = publisher.build(
                    {
                        "result_mid": t.result_mid,
                        "study": t.pseudonym,
                        "bundle_id": t.bundle_id,
                        "bundle_version": t.bundle_version,
                        "kind": kind,
                        "label": label,
                        "verdict": verdict,
                        "outcome_code": outcome_code if kind == "outcome" else None,
                        "outcome_positive": outcome_positive,
                        "role": role,
                        "day": day,
                        "revision": revision,
                    }
                )
            planned.append((t, revision, message))
        written: list[int] = []
        with store.transaction() as tx:
            _check_study(tx, study_id)  # purged meanwhile: nothing is written
            if any(_next_revision(tx, t.result_id, kind, label or "") != rev for t, rev, _ in planned):
                continue  # another revision was recorded meanwhile: build again with the next one
            for t, revision, message in planned:
                cur = tx.execute(
                    "INSERT INTO feedback(study_id, result_id, bundle_id, bundle_version, kind, label, verdict,"
                    " outcome_code, outcome_positive, revision, actor, role, given_at, message_id)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        study_id,
                        t.result_id,
                        t.bundle_id,
                        t.bundle_version,
                        kind,
                        label or "",
                        verdict,
                        outcome_code if kind == "outcome" else None,
                        None if outcome_positive is None else int(outcome_positive),
                        revision,
                        actor,
                        role,
                        given_at,
                        message[0] if message else None,
                    ),
                )
                written.append(int(cur.lastrowid or 0))
                if message is not None and publisher is not None:
                    publisher.enqueue(tx, message[0], message[1])
                record_event(
                    store,
                    AuditEvent.FEEDBACK,
                    actor=actor,
                    subject=t.pseudonym or f"study:{study_id}",
                    detail={
                        "bundle": f"{t.bundle_id}@{t.bundle_version}",
                        "kind": kind,
                        "label": label,
                        "verdict": verdict,
                        "outcome": outcome_code if kind == "outcome" else None,
                        "revision": revision,
                        "role": role,
                        "sent": message is not None,
                    },
                    source_ip=source_ip,
                )
        if publisher is not None and any(m is not None for _, _, m in planned):
            publisher.committed()
        log.info("feedback recorded", study_id=study_id, kind=kind, label=label, actor=actor, rows=len(written))
        marks = ",".join("?" * len(written))
        return [
            _entry(r) for r in store.query(f"SELECT * FROM feedback WHERE id IN ({marks}) ORDER BY id", tuple(written))
        ]
    raise FeedbackRefused(f"study {study_id}: feedback given at the same time by others; try again")
