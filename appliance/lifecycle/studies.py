"""The study lifecycle: the one module that writes the ``studies`` and ``study_events`` tables.

A study revision (one ``studies`` row) moves through the states below; :data:`TRANSITIONS` lists every move
allowed. Each move is a compare-and-set on the current state (``UPDATE studies ... WHERE id=? AND state=?``)
and a ``study_events`` row, both in the caller's transaction, so two writers can never both move one
study: the loser gets :class:`LostRace`, an illegal move :class:`IllegalTransition`, and nothing changes.

::

    received -> complete -> inferring -> inferred -> exported -> purged
                   |            |  ^          ^  |
                   |            |  +- complete  +-- (resend: exported -> inferred)
                   |            +-> no_model | not_analysed | not_processable | failed -> purged
                   +-> failed (attempts used up) | superseded -> purged

    inferred | exported | no_model | not_analysed | not_processable | failed -> complete   (an operator's retry)

``studies.attempts`` counts how often the worker began inferring a revision (:func:`begin_inference`);
once it reaches ``pipeline.max_attempts`` an interrupted or crashing study is ended ``failed`` with the
reason (:func:`retry_or_fail`) instead of being retried for ever.

Ingest bookkeeping that is not a state change (``last_instance_at``, ``assoc_open``, a new revision, dropping
a revision that never got an instance) is written here too, through the functions below.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from appliance.core.store import now

# Study states, in the order a study moves through them. Terminal states are final for a revision.
RECEIVED = "received"  # instances arriving
COMPLETE = "complete"  # association released and quiet period over
INFERRING = "inferring"  # the worker is analysing it (attempts counts how often this began)
INFERRED = "inferred"  # results built and durable, export queued
EXPORTED = "exported"  # every destination acknowledged
NO_MODEL = "no_model"  # no active bundle's modality matches: recorded, not an error
NOT_ANALYSED = "not_analysed"  # a bundle's modality matches but its input gate refused every image (reason per image)
NOT_PROCESSABLE = "not_processable"  # input the models cannot take (reason recorded)
FAILED = "failed"  # inference or result building failed, timed out or was interrupted too often (reason recorded)
SUPERSEDED = "superseded"  # a later revision of the same study replaced this one
PURGED = "purged"  # retention over: received files and results deleted, findings kept without PHI
STUDY_STATES = (
    RECEIVED,
    COMPLETE,
    INFERRING,
    INFERRED,
    EXPORTED,
    NO_MODEL,
    NOT_ANALYSED,
    NOT_PROCESSABLE,
    FAILED,
    SUPERSEDED,
    PURGED,
)
# States after which nothing more happens to a revision's files: retention may purge them.
SETTLED_STATES = (EXPORTED, NO_MODEL, NOT_ANALYSED, NOT_PROCESSABLE, FAILED, SUPERSEDED)
# States a revision passes through; each is resumed or ended at startup (``lifecycle.recovery``).
TRANSIENT_STATES = (COMPLETE, INFERRING, INFERRED)

# from-state -> the states it may move to. Everything else raises IllegalTransition.
TRANSITIONS: dict[str, frozenset[str]] = {
    RECEIVED: frozenset({COMPLETE, FAILED}),  # failed: stalled past retention.stalled_days (retention)
    COMPLETE: frozenset({INFERRING, FAILED, SUPERSEDED}),
    INFERRING: frozenset({INFERRED, NO_MODEL, NOT_ANALYSED, NOT_PROCESSABLE, FAILED, COMPLETE}),
    INFERRED: frozenset({EXPORTED, PURGED, COMPLETE}),
    EXPORTED: frozenset({INFERRED, PURGED, COMPLETE}),
    NO_MODEL: frozenset({PURGED, COMPLETE}),
    NOT_ANALYSED: frozenset({PURGED, COMPLETE}),
    NOT_PROCESSABLE: frozenset({PURGED, COMPLETE}),
    FAILED: frozenset({PURGED, COMPLETE}),
    SUPERSEDED: frozenset({PURGED}),
    PURGED: frozenset(),
}

DETAIL_MAX = 2000  # characters of detail kept on the study row and its event


class IllegalTransition(Exception):
    """A move that :data:`TRANSITIONS` does not allow (or to/from an unknown state)."""

    def __init__(self, study_id: int, from_state: str, to_state: str, why: str = "not an allowed transition"):
        self.study_id = study_id
        self.from_state = from_state
        self.to_state = to_state
        super().__init__(f"study {study_id}: {from_state} -> {to_state}: {why}")


class LostRace(IllegalTransition):
    """The study was not in the expected state any more (another writer moved it first)."""

    def __init__(self, study_id: int, expected: str, to_state: str, actual: str | None):
        self.actual = actual
        why = "no such study" if actual is None else f"it is {actual} now"
        super().__init__(study_id, expected, to_state, f"expected {expected}, {why}")


@dataclass(frozen=True)
class Study:
    """The lifecycle fields of one revision."""

    id: int
    study_uid: str
    revision: int
    state: str
    detail: str | None
    attempts: int


def get(conn: sqlite3.Connection, study_id: int) -> Study | None:
    """The revision's lifecycle fields, or None when there is no such row."""
    r = conn.execute(
        "SELECT id, study_uid, revision, state, detail, attempts FROM studies WHERE id=?", (study_id,)
    ).fetchone()
    if r is None:
        return None
    return Study(int(r["id"]), r["study_uid"], int(r["revision"]), r["state"], r["detail"], int(r["attempts"]))


def check(study_id: int, from_state: str, to_state: str) -> None:
    """Raise :class:`IllegalTransition` unless ``from_state -> to_state`` is in :data:`TRANSITIONS`."""
    if from_state not in TRANSITIONS or to_state not in TRANSITIONS:
        raise IllegalTransition(study_id, from_state, to_state, "unknown state")
    if to_state not in TRANSITIONS[from_state]:
        raise IllegalTransition(study_id, from_state, to_state)


def transition(
    conn: sqlite3.Connection,
    study_id: int,
    from_state: str,
    to_state: str,
    detail: str | None = None,
    *,
    attempts_delta: int = 0,
    completed: bool = False,
) -> None:
    """Move one revision ``from_state -> to_state`` in the caller's transaction and record the event.

    ``attempts_delta`` is added to ``studies.attempts``; ``completed`` also stamps ``completed_at``.
    Raises :class:`IllegalTransition` for a move not in :data:`TRANSITIONS`, :class:`LostRace` when the
    study is not in ``from_state`` (moved by someone else, or missing); nothing is written then.
    """
    check(study_id, from_state, to_state)
    detail = detail[:DETAIL_MAX] if detail else detail
    ts = now()
    cur = conn.execute(
        "UPDATE studies SET state=?, detail=?, updated_at=?, attempts=attempts+?,"
        " completed_at=CASE WHEN ? THEN ? ELSE completed_at END WHERE id=? AND state=?",
        (to_state, detail, ts, attempts_delta, int(completed), ts, study_id, from_state),
    )
    if cur.rowcount != 1:
        row = conn.execute("SELECT state FROM studies WHERE id=?", (study_id,)).fetchone()
        raise LostRace(study_id, from_state, to_state, None if row is None else row["state"])
    conn.execute(
        "INSERT INTO study_events(study_id, from_state, to_state, at, detail) VALUES (?,?,?,?,?)",
        (study_id, from_state, to_state, ts, detail),
    )


# -- the worker's attempts --------------------------------------------------------------------------------------


def begin_inference(conn: sqlite3.Connection, study_id: int, max_attempts: int) -> bool:
    """``complete -> inferring`` with one more attempt; True when the worker may go on.

    A revision that already used ``max_attempts`` is ended ``failed`` instead (False). Raises
    :class:`LostRace` when the study is not ``complete`` any more.
    """
    st = get(conn, study_id)
    if st is None or st.state != COMPLETE:
        raise LostRace(study_id, COMPLETE, INFERRING, None if st is None else st.state)
    if st.attempts >= max_attempts:
        last = f" (last: {st.detail})" if st.detail else ""
        transition(conn, study_id, COMPLETE, FAILED, f"gave up after {st.attempts} attempt(s){last}")
        return False
    transition(conn, study_id, COMPLETE, INFERRING, f"attempt {st.attempts + 1} of {max_attempts}", attempts_delta=1)
    return True


def retry_or_fail(conn: sqlite3.Connection, study_id: int, reason: str, max_attempts: int) -> str:
    """An ``inferring`` revision was interrupted or its processing raised: back to ``complete`` for another
    attempt while it has attempts left, else ``failed`` with the reason. Returns the new state.
    Raises :class:`LostRace` when the study is not ``inferring``."""
    st = get(conn, study_id)
    if st is None or st.state != INFERRING:
        raise LostRace(study_id, INFERRING, COMPLETE, None if st is None else st.state)
    if st.attempts >= max_attempts:
        transition(conn, study_id, INFERRING, FAILED, f"{reason}; gave up after {st.attempts} attempt(s)")
        return FAILED
    transition(conn, study_id, INFERRING, COMPLETE, f"{reason}; retrying (attempt {st.attempts} of {max_attempts})")
    return COMPLETE


# States an operator may send back to analysis (:func:`reopen`): analysed or ended, files still there.
REOPENABLE_STATES = (INFERRED, EXPORTED, NO_MODEL, NOT_ANALYSED, NOT_PROCESSABLE, FAILED)


def reopen(conn: sqlite3.Connection, study_id: int, why: str) -> Study:
    """An operator's retry: move a revision in one of :data:`REOPENABLE_STATES` back to ``complete`` with its
    attempts reset to 0, so the worker analyses it again (it polls for ``complete`` studies). The same inputs
    and bundle versions give the same result UIDs, so nothing is duplicated in the PACS; export rows already
    acknowledged stay acknowledged. Returns the study as it was before. Raises :class:`LostRace` when there is
    no such study, :class:`IllegalTransition` from any other state (nothing written then)."""
    st = get(conn, study_id)
    if st is None:
        raise LostRace(study_id, "?", COMPLETE, None)
    if st.state not in REOPENABLE_STATES:
        raise IllegalTransition(study_id, st.state, COMPLETE, "only an analysed or ended study can be re-analysed")
    transition(conn, study_id, st.state, COMPLETE, why)
    conn.execute("UPDATE studies SET attempts=0 WHERE id=?", (study_id,))
    return st


# -- ingest bookkeeping -----------------------------------------------------------------------------------------


def open_revision(
    conn: sqlite3.Connection,
    study_uid: str,
    revision: int,
    modality: str | None,
    calling_ae: str,
    detail: str,
    at: float,
) -> int:
    """Create revision ``revision`` of a study in state ``received`` (with its first event); returns its id.
    Raises ``sqlite3.IntegrityError`` if that revision exists."""
    cur = conn.execute(
        "INSERT INTO studies(study_uid, revision, state, modality, calling_ae, created_at, updated_at,"
        " last_instance_at, assoc_open) VALUES (?,?,?,?,?,?,?,?,0)",
        (study_uid, revision, RECEIVED, modality, calling_ae, at, at, at),
    )
    study_id = int(cur.lastrowid or 0)  # always set after an INSERT
    conn.execute(
        "INSERT INTO study_events(study_id, from_state, to_state, at, detail) VALUES (?,?,?,?,?)",
        (study_id, None, RECEIVED, at, detail),
    )
    return study_id


def note_instance(conn: sqlite3.Connection, study_id: int, at: float, opens: int, modality: str | None) -> None:
    """An instance was filed under the revision: ``last_instance_at``, ``opens`` more open associations
    (0 or 1), and the modality if none is known yet."""
    conn.execute(
        "UPDATE studies SET last_instance_at=?, updated_at=?, assoc_open=assoc_open+?,"
        " modality=COALESCE(modality, ?) WHERE id=?",
        (at, at, opens, modality, study_id),
    )


def release_associations(conn: sqlite3.Connection, study_ids: set[int], at: float) -> None:
    """One association that delivered to these revisions ended: it no longer holds them open."""
    for sid in study_ids:
        conn.execute("UPDATE studies SET assoc_open=MAX(assoc_open-1, 0), updated_at=? WHERE id=?", (at, sid))


def reset_open_associations(conn: sqlite3.Connection) -> int:
    """At startup no association is open, whatever a crash left behind; returns the rows changed."""
    return conn.execute("UPDATE studies SET assoc_open=0 WHERE assoc_open != 0").rowcount


def drop_empty_revision(conn: sqlite3.Connection, study_id: int) -> bool:
    """Delete a ``received`` revision that has no instance (its only one was never acknowledged), with its
    events; kept when another table already refers to it. True when it went."""
    st = conn.execute("SELECT state FROM studies WHERE id=?", (study_id,)).fetchone()
    empty = conn.execute("SELECT 1 FROM instances WHERE study_id=? LIMIT 1", (study_id,)).fetchone() is None
    if st is None or st["state"] != RECEIVED or not empty:
        return False
    conn.execute("SAVEPOINT drop_study")
    try:
        conn.execute("DELETE FROM study_events WHERE study_id=?", (study_id,))
        conn.execute("DELETE FROM studies WHERE id=? AND state=?", (study_id, RECEIVED))
    except sqlite3.IntegrityError:  # another subsystem already refers to it: keep the empty revision
        conn.execute("ROLLBACK TO drop_study")
        conn.execute("RELEASE drop_study")
        return False
    conn.execute("RELEASE drop_study")
    return True
