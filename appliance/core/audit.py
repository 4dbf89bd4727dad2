"""The audit trail: an append-only, hash-chained log of who did what on the box, in the state store.

This module is the ONE writer of the ``audit_log`` and ``audit_anchor`` tables (migration 0007). Callers
record with :func:`record_event`; readers use :func:`query`; :func:`verify` checks the chain.

Each entry holds ``seq`` (1, 2, 3, ...), ``time`` (UTC, ISO 8601 with microseconds, e.g.
``2026-11-29T11:45:47.123456+00:00``), ``event`` (an :class:`AuditEvent` value), ``actor``, ``outcome``
(``success`` | ``failure``), ``subject``, ``source_ip``, ``detail`` (canonical JSON: sorted keys, no
whitespace, UTF-8), ``prev_hash`` (the previous entry's ``hash``; 64 zeros for the first) and ``hash``:
SHA-256 (hex) of the UTF-8 bytes of the canonical row (:func:`canonical_row`) followed by ``prev_hash``.

Integrity, and its limits (said plainly):

- SQLite triggers refuse UPDATE and DELETE on ``audit_log`` (and DELETE, or a backwards move, of the
  anchor), so no code path of the appliance, nor a careless ``sqlite3`` session, changes the trail.
- Someone who drops the triggers and edits a row is caught by :func:`verify` (the row's hash no longer
  matches); deleting a row leaves a gap in ``seq`` or, if the rest were renumbered, a broken chain.
- Deleting the newest entries leaves a consistent chain; the anchor (``audit_anchor``: the last seq and
  hash, written in the same transaction as each entry, outside any table the retention purge touches)
  then names the truncated tail.
- The chain is not signed and the anchor lives in the same database: an attacker with write access to
  ``state.db`` who rewrites every later hash *and* the anchor, or replaces the whole file with an older
  copy, is not detected here. Forwarding entries off the box as they happen (DICOM audit messages to
  the hospital's audit repository, :mod:`appliance.core.audit_syslog`) is what covers that.

The trail holds no PHI (actors are user names or roles, subjects are pseudonyms, ids or bundle
versions) and retention never purges it.
"""

from __future__ import annotations

import getpass
import hashlib
import ipaddress
import json
import os
import re
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from appliance.core.enums import StrEnum
from appliance.core.logs import get_logger
from appliance.core.store import Store

log = get_logger(__name__)

GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first entry."""

SUCCESS = "success"
FAILURE = "failure"
OUTCOMES = (SUCCESS, FAILURE)


class AuditEvent(StrEnum):
    """The event vocabulary (the string values are what the table stores)."""

    LOGIN = "login"
    LOGIN_FAILED = "login_failed"
    LOGOUT = "logout"
    LOCKOUT = "lockout"
    STUDY_VIEWED = "study_viewed"
    STUDY_RETRY = "study_retry"
    STUDY_RESEND = "study_resend"
    CONFIG_CHANGED = "config_changed"
    USER_ADDED = "user_added"
    USER_CHANGED = "user_changed"
    MODEL_INSTALLED = "model_installed"
    MODEL_ACTIVATED = "model_activated"
    MODEL_ROLLED_BACK = "model_rolled_back"
    MODEL_UPDATE = "model_update"
    PROVISIONING = "provisioning"
    EXPORT = "export"
    PURGE = "purge"
    SELFTEST = "selftest"
    APPLIANCE_STARTED = "appliance_started"
    APPLIANCE_STOPPED = "appliance_stopped"
    FEEDBACK = "feedback"


@dataclass(frozen=True)
class AuditEntry:
    """One stored entry; ``detail`` is the decoded JSON object (``{}`` when none was given)."""

    seq: int
    time: str
    event: str
    actor: str
    outcome: str
    subject: str | None
    source_ip: str | None
    detail: dict[str, Any] = field(default_factory=dict)
    prev_hash: str = GENESIS_HASH
    hash: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every column."""
        return {
            "seq": self.seq,
            "time": self.time,
            "event": self.event,
            "actor": self.actor,
            "outcome": self.outcome,
            "subject": self.subject,
            "source_ip": self.source_ip,
            "detail": self.detail,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class AuditFault:
    """One integrity fault found by :func:`verify`.

    ``seq`` is the entry concerned (for a run of deleted entries, the first of them); ``kind`` is one of
    ``edited`` (stored hash does not match the row, or a column holds what no appliance code writes: NULL,
    a BLOB or number, bytes that are not UTF-8), ``deleted`` (seq gap), ``duplicate`` (a seq seen before:
    a copied or out-of-order entry), ``broken_chain`` (``prev_hash``
    is not the previous entry's hash: that entry was replaced, or entries were removed and renumbered),
    ``truncated`` (entries after the last stored one are missing, per the anchor), ``anchor`` (anchor
    missing or disagreeing with the last entry); ``message`` says it in words.
    """

    seq: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.kind}: {self.message}"


class AuditError(ValueError):
    """An entry that cannot be recorded (unknown event or outcome, empty actor, bad IP, non-JSON detail)."""


def cli_actor() -> str:
    """The actor of a command-line action: ``cli:<os user>`` (``cli:uid<N>`` when the user has no name)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (a bare container)
        return f"cli:uid{os.getuid()}"


def utc_timestamp(when: datetime | None = None) -> str:
    """``when`` (default: now) as the trail's time format: UTC ISO 8601 with microseconds and ``+00:00``.

    A naive ``datetime`` is taken as UTC.
    """
    when = when or datetime.now(timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="microseconds")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _storable(text: str) -> str:
    """``text`` as UTF-8 can hold it: a lone surrogate (``json.loads`` makes one from ``"\\ud800"`` in a
    cloud payload) is written as its ``\\udXXX`` escape instead of failing the whole entry."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def canonical_detail(detail: Mapping[str, Any] | None) -> str:
    """``detail`` as canonical JSON text (sorted keys, no whitespace, non-ASCII kept).

    Raises :class:`AuditError` if it is not a mapping of JSON values (str keys; str, int, float, bool,
    None, lists and mappings of those; no NaN/Infinity).
    """
    if detail is None:
        return "{}"
    if not isinstance(detail, Mapping):
        raise AuditError(f"detail must be a mapping, got {type(detail).__name__}")
    try:
        text = json.dumps(dict(detail), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AuditError(f"detail is not JSON-serialisable: {exc}") from exc
    # a lone surrogate can only sit inside a JSON string: written as an escaped backslash and "udXXX", it reads
    # back as that text (not as "\\udXXX", a JSON escape that would make the surrogate again)
    return _SURROGATE.sub(lambda m: f"\\\\u{ord(m.group()):04x}", text)


def canonical_row(
    seq: int,
    time: str,
    event: str,
    actor: str,
    outcome: str,
    subject: str | None,
    source_ip: str | None,
    detail_json: str,
) -> str:
    """The canonical text of one row, the hashed content: a JSON object of the columns (``detail`` as
    its stored canonical JSON *text*), sorted keys, no whitespace, non-ASCII kept."""
    row = {
        "seq": seq,
        "time": time,
        "event": event,
        "actor": actor,
        "outcome": outcome,
        "subject": subject,
        "source_ip": source_ip,
        "detail": detail_json,
    }
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_hash(canonical: str, prev_hash: str) -> str:
    """SHA-256 (64 lowercase hex digits) of ``canonical`` + ``prev_hash``, UTF-8 encoded."""
    return hashlib.sha256((canonical + prev_hash).encode("utf-8")).hexdigest()


@contextmanager
def _write_transaction(store: Store) -> Iterator[sqlite3.Connection]:
    conn = store.conn
    if conn.in_transaction:  # join the caller's transaction (Store.transaction is BEGIN IMMEDIATE)
        yield conn
        return
    with store.transaction() as c:
        yield c


def record_event(
    store: Store,
    event: AuditEvent,
    *,
    actor: str,
    outcome: str = SUCCESS,
    subject: str | None = None,
    detail: Mapping[str, Any] | None = None,
    source_ip: str | None = None,
) -> int:
    """Append one entry to the trail and return its sequence number (1-based).

    ``actor``: a user name, ``"system"``, ``"cloud"`` (twin/direct method) or ``"cli:<os user>"``;
    ``outcome``: ``"success"`` | ``"failure"``; ``subject``: e.g. a study's pseudonym/id, a bundle
    ``id@version``, a user name; ``detail``: JSON values only, no PHI; ``source_ip``: IPv4/IPv6 text.
    Text UTF-8 cannot hold (lone surrogates) is stored as its ``\\udXXX`` escape, never refused: a value
    from outside must not cost its entry.

    Reading the last hash and inserting happen in one ``BEGIN IMMEDIATE`` transaction, so concurrent
    writers (threads or processes) serialise and the chain stays linear. Called inside an open
    transaction of the same thread's connection, the entry joins it (and is rolled back with it).
    The commit is fsynced before this returns (the store's ``synchronous=FULL``).

    Raises :class:`AuditError` for an unknown event or outcome, an empty actor, a malformed
    ``source_ip`` or a non-JSON ``detail``; :class:`sqlite3.Error` if the database cannot be written.
    """
    try:
        event_value = AuditEvent(event).value
    except ValueError as exc:
        raise AuditError(f"unknown audit event {event!r}") from exc
    if outcome not in OUTCOMES:
        raise AuditError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    if not isinstance(actor, str) or not actor.strip():
        raise AuditError("actor must be a non-empty string")
    if subject is not None and not isinstance(subject, str):
        raise AuditError(f"subject must be a string or None, got {type(subject).__name__}")
    if source_ip is not None:
        try:
            source_ip = str(ipaddress.ip_address(source_ip))
        except ValueError as exc:
            raise AuditError(f"source_ip is not an IP address: {source_ip!r}") from exc
    detail_json = canonical_detail(detail)
    actor = _storable(actor)
    subject = None if subject is None else _storable(subject)
    with _write_transaction(store) as conn:
        last = conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
        seq = 1 if last is None else int(last["seq"]) + 1
        prev_hash = GENESIS_HASH if last is None else str(last["hash"])
        time = utc_timestamp()
        digest = entry_hash(
            canonical_row(seq, time, event_value, actor, outcome, subject, source_ip, detail_json), prev_hash
        )
        conn.execute(
            "INSERT INTO audit_log(seq, time, event, actor, outcome, subject, source_ip, detail, prev_hash, hash)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)",
            (seq, time, event_value, actor, outcome, subject, source_ip, detail_json, prev_hash, digest),
        )
        conn.execute(
            "INSERT INTO audit_anchor(id, last_seq, last_hash) VALUES (1, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET last_seq = excluded.last_seq, last_hash = excluded.last_hash",
            (seq, digest),
        )
    log.info("audit event recorded", seq=seq, event_type=event_value, actor=actor, outcome=outcome)
    return seq


# Every text column, read as (SQLite type, raw bytes) so that a value no appliance code writes (a BLOB, a number,
# bytes that are not UTF-8, which sqlite3 cannot even fetch as ``str``) is reported, never a crash of the reader.
_TEXT_COLUMNS = ("time", "event", "actor", "outcome", "subject", "source_ip", "detail", "prev_hash", "hash")
_NULLABLE = frozenset({"subject", "source_ip"})
_ROW_SELECT = "SELECT seq, typeof(seq) AS t_seq, " + ", ".join(
    f"typeof({c}) AS t_{c}, CAST({c} AS BLOB) AS {c}" for c in _TEXT_COLUMNS
)


@dataclass(frozen=True)
class _RawRow:
    """One ``audit_log`` row as stored: ``values`` decoded for reading (bad UTF-8 replaced by U+FFFD, other
    types as their text), ``problems`` naming each column that does not hold what :func:`record_event` writes."""

    seq: int
    values: dict[str, str | None]
    problems: tuple[str, ...]


def _raw_row(row: sqlite3.Row) -> _RawRow:
    problems: list[str] = []
    values: dict[str, str | None] = {}
    seq_value = row["seq"]
    if row["t_seq"] != "integer":
        problems.append(f"seq holds a {row['t_seq']} ({seq_value!r}), not an integer")
        try:
            seq = int(seq_value)
        except (TypeError, ValueError, OverflowError):
            seq = 0
    else:
        seq = int(seq_value)
    for column in _TEXT_COLUMNS:
        kind, raw = row[f"t_{column}"], row[column]
        if kind == "null":
            values[column] = None
            if column not in _NULLABLE:
                problems.append(f"{column} is NULL")
            continue
        data = bytes(raw)
        try:
            values[column] = data.decode("utf-8")
        except UnicodeDecodeError:
            values[column] = data.decode("utf-8", "replace")
            problems.append(f"{column} is not valid UTF-8 text")
            continue
        if kind != "text":
            problems.append(f"{column} holds a {kind}, not text")
    return _RawRow(seq, values, tuple(problems))


def _entry(row: sqlite3.Row) -> AuditEntry:
    raw = _raw_row(row)
    v = raw.values
    try:
        detail = json.loads(v["detail"] or "")
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json follows (a tampered row)
        detail = {"_unreadable": v["detail"]}
    return AuditEntry(
        seq=raw.seq,
        time=v["time"] or "",
        event=v["event"] or "",
        actor=v["actor"] or "",
        outcome=v["outcome"] or "",
        subject=v["subject"],
        source_ip=v["source_ip"],
        detail=detail if isinstance(detail, dict) else {"_value": detail},
        prev_hash=v["prev_hash"] or "",
        hash=v["hash"] or "",
    )


def _time_bound(value: datetime | str | None, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise AuditError(f"{name} is not an ISO 8601 date/time: {value!r}") from exc
    return utc_timestamp(value)


def _where(
    since: datetime | str | None,
    until: datetime | str | None,
    filters: Mapping[str, str | None],
    after_seq: int | None,
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    lo, hi = _time_bound(since, "since"), _time_bound(until, "until")
    if lo is not None:
        clauses.append("time >= ?")
        params.append(lo)
    if hi is not None:
        clauses.append("time < ?")
        params.append(hi)
    if after_seq is not None:
        clauses.append("seq > ?")
        params.append(int(after_seq))
    for column, value in filters.items():
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(str(value))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def query(
    store: Store,
    *,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    event: AuditEvent | str | None = None,
    actor: str | None = None,
    subject: str | None = None,
    outcome: str | None = None,
    limit: int | None = None,
    offset: int = 0,
    newest_first: bool = True,
    after_seq: int | None = None,
) -> list[AuditEntry]:
    """Entries matching every given filter, newest first by default (``newest_first=False``: in order).

    ``since`` (inclusive) and ``until`` (exclusive) are ``datetime`` (naive = UTC) or ISO 8601 text (a
    date alone means its midnight UTC); ``event``, ``actor``, ``subject``, ``outcome`` match exactly;
    ``limit`` (None = all) and ``offset`` page the result; ``after_seq`` keeps entries with a greater
    seq (a reader's cursor). Raises :class:`AuditError` for a malformed time or a negative limit/offset.
    """
    if (limit is not None and limit < 0) or offset < 0:
        raise AuditError("limit and offset must not be negative")
    filters = {"event": event, "actor": actor, "subject": subject, "outcome": outcome}
    where, params = _where(since, until, filters, after_seq)
    sql = f"{_ROW_SELECT} FROM audit_log{where} ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ? OFFSET ?"
    params += [-1 if limit is None else limit, offset]
    return [_entry(r) for r in store.query(sql, tuple(params))]


def count(
    store: Store,
    *,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    event: AuditEvent | str | None = None,
    actor: str | None = None,
    subject: str | None = None,
    outcome: str | None = None,
) -> int:
    """How many entries match the filters (as in :func:`query`; none given: the whole trail)."""
    filters = {"event": event, "actor": actor, "subject": subject, "outcome": outcome}
    where, params = _where(since, until, filters, None)
    return int(store.query(f"SELECT COUNT(*) FROM audit_log{where}", tuple(params))[0][0])


def verify(store: Store) -> list[AuditFault]:
    """Check the whole chain and the anchor; ``[]`` means intact. Reads one consistent snapshot.

    Names each edited entry (hash mismatch), each run of deleted entries (seq gap), each break in the
    chain (``prev_hash`` not the previous entry's hash), a truncated tail (the anchor's last seq is
    beyond the last entry) and an anchor that is missing, disagrees with the last entry or holds values of
    the wrong type. Hostile values in any column are faults of their entry, never an exception, and the
    rest of the chain is still checked. See the module docstring for what cannot be detected. Raises
    :class:`sqlite3.Error` only if the database itself cannot be read.
    """
    faults: list[AuditFault] = []
    conn = store.conn
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")  # a read snapshot: entries and anchor seen at one instant
    try:
        expected_seq = 1
        prev_hash: str | None = GENESIS_HASH  # None: the previous entry's hash is unreadable, no link to check
        last_seq = 0
        last_hash: str | None = None
        for row in conn.execute(f"{_ROW_SELECT} FROM audit_log ORDER BY seq"):
            raw = _raw_row(row)
            seq, v = raw.seq, raw.values
            if raw.problems:
                faults.append(AuditFault(seq, "edited", "; ".join(raw.problems)))
                prev_hash = v["hash"] if not any(p.startswith("hash ") for p in raw.problems) else None
                last_seq, last_hash = max(last_seq, seq), prev_hash
                expected_seq = max(expected_seq, seq + 1)
                continue
            if seq < expected_seq:
                faults.append(AuditFault(seq, "duplicate", f"a second entry {seq} (copied or inserted out of order)"))
                continue
            gap = seq != expected_seq
            if gap:
                first, end = expected_seq, seq - 1
                what = f"entry {first}" if first == end else f"entries {first}-{end}"
                faults.append(AuditFault(first, "deleted", f"{what} missing (seq gap before {seq})"))
            canonical = canonical_row(
                seq,
                str(v["time"]),
                str(v["event"]),
                str(v["actor"]),
                str(v["outcome"]),
                v["subject"],
                v["source_ip"],
                str(v["detail"]),
            )
            if entry_hash(canonical, str(v["prev_hash"])) != v["hash"]:
                faults.append(AuditFault(seq, "edited", "stored hash does not match the entry's content"))
            elif not gap and prev_hash is not None and v["prev_hash"] != prev_hash:
                before = f"entry {seq - 1}" if seq > 1 else "the chain's start"
                faults.append(
                    AuditFault(
                        seq,
                        "broken_chain",
                        f"prev_hash does not match {before}'s hash ({before} replaced, or entries removed)",
                    )
                )
            prev_hash = v["hash"]
            last_seq, last_hash = seq, v["hash"]
            expected_seq = seq + 1
        anchor = conn.execute(
            "SELECT typeof(last_seq) AS t_seq, last_seq, typeof(last_hash) AS t_hash, last_hash"
            " FROM audit_anchor WHERE id = 1"
        ).fetchone()
    finally:
        if own:
            conn.execute("COMMIT")
    if anchor is None:
        if last_seq:
            faults.append(AuditFault(last_seq, "anchor", "anchor row missing although entries exist"))
        return faults
    if anchor["t_seq"] != "integer" or anchor["t_hash"] != "text":
        faults.append(
            AuditFault(
                last_seq,
                "anchor",
                f"anchor holds last_seq as {anchor['t_seq']} and last_hash as {anchor['t_hash']}"
                " (integer and text expected): it was written outside the audit trail",
            )
        )
        return faults
    a_seq, a_hash = int(anchor["last_seq"]), str(anchor["last_hash"])
    if a_seq > last_seq:
        first = last_seq + 1
        what = f"entry {first}" if first == a_seq else f"entries {first}-{a_seq}"
        faults.append(AuditFault(first, "truncated", f"{what} missing at the end (anchor records seq {a_seq})"))
    elif a_seq < last_seq:
        faults.append(
            AuditFault(a_seq + 1, "anchor", f"entries after {a_seq} were not written through the audit trail")
        )
    elif a_hash != last_hash:
        faults.append(AuditFault(last_seq, "anchor", "last entry's hash differs from the anchor (entry replaced)"))
    return faults
