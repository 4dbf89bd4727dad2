"""The durable cloud outbox: SQLite rows that leave only on the hub's PUBACK (or a logged expiry/eviction).

``enqueue`` runs inside the caller's transaction, so a result and its message commit together. The sender
reads rows in (priority DESC, seq) order, publishes them at QoS 1 and deletes them (with an ``outbox_log``
'sent' row) once acknowledged. Message ids are stable, so a resend after a crash is a duplicate the cloud
can drop. Budget: rows past their TTL expire; above the byte budget the oldest rows are evicted, health
first, then stats, audit, feedback, results last; every removal is logged and recorded.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Literal

from appliance.core.logs import get_logger

log = get_logger(__name__)

Kind = Literal["result", "health", "audit", "stats", "feedback"]
KINDS: tuple[str, ...] = ("result", "health", "audit", "stats", "feedback")  # the table's CHECK (migration 0014)
PRIORITY: dict[str, int] = {"result": 100, "feedback": 60, "audit": 50, "stats": 30, "health": 10}
URGENT_RESULT_PRIORITY = 200  # a result with an urgent finding (triage) goes before every other message
# first evicted first: a radiologist's feedback cannot be computed again, so it goes just before results
EVICTION_ORDER: tuple[str, ...] = ("health", "stats", "audit", "feedback", "result")
DEFAULT_TTL_S = 60 * 86400.0
MAX_MESSAGE_BYTES = 256 * 1024
MAX_MESSAGE_ID = 128


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    message_id: str
    kind: str
    priority: int
    body: bytes
    props: dict[str, str]
    created_at: float


def enqueue(
    conn: sqlite3.Connection,
    *,
    kind: Kind,
    message_id: str,
    body: bytes,
    priority: int | None = None,
    props: dict[str, str] | None = None,
    ttl_s: float = DEFAULT_TTL_S,
    max_bytes: int | None = None,
    now: float | None = None,
) -> bool:
    """Queue one message in the caller's transaction; False if this message id is already queued.

    ``max_bytes`` (the disk budget) triggers expiry and eviction when the outbox grows past it. The caller
    tells the sender (``OutboxSender.notify_queued``) once committed; the sender also polls.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown outbox kind {kind!r}; expected one of {KINDS}")
    if not message_id or len(message_id) > MAX_MESSAGE_ID or not message_id.isascii():
        raise ValueError(f"message id must be 1-{MAX_MESSAGE_ID} ASCII characters: {message_id!r}")
    props = dict(props or {})
    size = len(body) + sum(len(k) + len(v) for k, v in props.items())
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"message {message_id} is {size} bytes, over IoT Hub's 256 KB limit")
    t = time.time() if now is None else now
    cur = conn.execute(
        "INSERT OR IGNORE INTO outbox(message_id, kind, priority, body, props, size, created_at, expires_at) "
        "VALUES (?,?,?,?,?,?,?,?)",
        (
            message_id,
            kind,
            PRIORITY[kind] if priority is None else priority,
            body,
            json.dumps(props),
            size,
            t,
            t + ttl_s,
        ),
    )
    if max_bytes is not None:
        enforce_budget(conn, max_bytes, now=t)
    return cur.rowcount == 1


def depth(conn: sqlite3.Connection) -> tuple[int, int]:
    """(messages, bytes) waiting."""
    row = conn.execute("SELECT count, bytes FROM outbox_totals WHERE id=1").fetchone()
    return int(row[0]), int(row[1])


def counts_by_kind(conn: sqlite3.Connection) -> dict[str, int]:
    return {r[0]: r[1] for r in conn.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind")}


def peek(
    conn: sqlite3.Connection,
    limit: int,
    exclude: set[int] | frozenset[int] = frozenset(),
    after: tuple[int, int] | None = None,
) -> list[OutboxRow]:
    """The next ``limit`` messages in send order, skipping the sequence numbers in ``exclude`` (in flight).

    ``after`` = (priority, seq) of the last message handed out: continue from there (the sender's cursor).
    """
    if after is None:
        rows = conn.execute(
            "SELECT seq, message_id, kind, priority, body, props, created_at FROM outbox "
            "ORDER BY priority DESC, seq LIMIT ?",
            (limit + len(exclude),),
        ).fetchall()
    else:
        rows = conn.execute(
            "SELECT seq, message_id, kind, priority, body, props, created_at FROM outbox "
            "WHERE priority < ? OR (priority = ? AND seq > ?) ORDER BY priority DESC, seq LIMIT ?",
            (after[0], after[0], after[1], limit + len(exclude)),
        ).fetchall()
    out = [OutboxRow(r[0], r[1], r[2], r[3], bytes(r[4]), json.loads(r[5]), r[6]) for r in rows if r[0] not in exclude]
    return out[:limit]


def mark_sent(conn: sqlite3.Connection, seqs: list[int], now: float | None = None) -> int:
    """Remove acknowledged messages (PUBACK received) and record them as sent; returns rows removed."""
    t = time.time() if now is None else now
    n = 0
    for i in range(0, len(seqs), 500):  # rows evicted/expired while in flight simply are not there any more
        chunk = seqs[i : i + 500]
        marks = ",".join("?" * len(chunk))
        conn.execute(
            "INSERT INTO outbox_log(message_id, kind, size, outcome, created_at, at) "
            f"SELECT message_id, kind, size, 'sent', created_at, ? FROM outbox WHERE seq IN ({marks}) ORDER BY seq",
            (t, *chunk),
        )
        n += conn.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", chunk).rowcount
    return n


def bump_attempts(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("UPDATE outbox SET attempts = attempts + 1 WHERE seq=?", (seq,))


def _remove(conn: sqlite3.Connection, rows: list[sqlite3.Row], outcome: str, t: float) -> None:
    for r in rows:
        conn.execute("DELETE FROM outbox WHERE seq=?", (r[0],))
        conn.execute(
            "INSERT INTO outbox_log(message_id, kind, size, outcome, created_at, at) VALUES (?,?,?,?,?,?)",
            (r[1], r[2], r[3], outcome, r[4], t),
        )


def enforce_budget(conn: sqlite3.Connection, max_bytes: int, now: float | None = None) -> dict[str, int]:
    """Expire rows past their TTL, then evict oldest rows (health, audit, results last) down to ``max_bytes``.

    Returns {"expired": n, "evicted_<kind>": n, ...}; every removal is logged as a warning.
    """
    t = time.time() if now is None else now
    report: dict[str, int] = {}
    expired = conn.execute(
        "SELECT seq, message_id, kind, size, created_at FROM outbox WHERE expires_at <= ?", (t,)
    ).fetchall()
    if expired:
        _remove(conn, expired, "expired", t)
        report["expired"] = len(expired)
        log.warning("outbox messages expired (TTL)", count=len(expired), kinds=sorted({r[2] for r in expired}))
    _, total = depth(conn)
    for kind in EVICTION_ORDER:
        if total <= max_bytes:
            break
        while total > max_bytes:
            rows = conn.execute(
                "SELECT seq, message_id, kind, size, created_at FROM outbox WHERE kind=? ORDER BY seq LIMIT 64",
                (kind,),
            ).fetchall()
            if not rows:
                break
            victims = []
            for r in rows:
                if total <= max_bytes:
                    break
                victims.append(r)
                total -= r[3]
            _remove(conn, victims, "evicted", t)
            report[f"evicted_{kind}"] = report.get(f"evicted_{kind}", 0) + len(victims)
        if report.get(f"evicted_{kind}"):
            log.warning(
                "outbox over its disk budget: evicted oldest messages",
                kind=kind,
                count=report[f"evicted_{kind}"],
                budget_bytes=max_bytes,
            )
    return report


def recent_log(conn: sqlite3.Connection, limit: int = 20) -> list[dict[str, object]]:
    rows = conn.execute(
        "SELECT message_id, kind, size, outcome, created_at, at FROM outbox_log ORDER BY id DESC LIMIT ?", (limit,)
    ).fetchall()
    return [dict(zip(("message_id", "kind", "size", "outcome", "created_at", "at"), r, strict=True)) for r in rows]
