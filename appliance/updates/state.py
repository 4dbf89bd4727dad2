"""The update agent's durable state: the only writer of ``model_updates`` and ``model_update_highest``.

Every step of an update is written here (and committed, fsynced) BEFORE the step runs, so a daemon killed at
any point finds, at its next start, the step it was in and resumes it or ends the update
(:meth:`appliance.updates.agent.UpdateAgent.start`). The highest version ever installed per bundle id is
kept apart from the models directory so that removing old versions never lowers the anti-rollback floor.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from appliance.core.store import Store
from appliance.updates.layout import UpdateState
from engines.manifest import version_key

TERMINAL = frozenset({UpdateState.IDLE, UpdateState.ACTIVE, UpdateState.FAILED, UpdateState.ROLLED_BACK})


@dataclass
class UpdateRow:
    """One bundle's update as persisted: the director's ``target`` version and the step it is at.

    ``bytes``/``total``: download progress in bytes (``total`` = the TUF target length once known);
    ``since``: epoch seconds of the last state change; ``health_deadline``: epoch seconds by which the health
    gate must pass; ``health_ok``: real studies the new version analysed without an engine error so far.
    """

    bundle_id: str
    target: str
    state: UpdateState
    bytes: int = 0
    total: int | None = None
    reason: str | None = None
    since: float = 0.0
    policy: dict[str, Any] = field(default_factory=dict)
    from_version: str | None = None
    health_deadline: float | None = None
    health_ok: int = 0
    selfcheck_done: bool = False

    @property
    def terminal(self) -> bool:
        """True when nothing is left to do for ``target`` (active, failed, rolled back or idle)."""
        return self.state in TERMINAL


_COLUMNS = (
    "bundle_id, target, state, bytes, total, reason, since, policy, from_version, health_deadline, health_ok, "
    "selfcheck_done"
)


def _row(r: Any) -> UpdateRow:
    return UpdateRow(
        bundle_id=r["bundle_id"],
        target=r["target"],
        state=UpdateState(r["state"]),
        bytes=int(r["bytes"]),
        total=r["total"],
        reason=r["reason"],
        since=float(r["since"]),
        policy=json.loads(r["policy"] or "{}"),
        from_version=r["from_version"],
        health_deadline=r["health_deadline"],
        health_ok=int(r["health_ok"]),
        selfcheck_done=bool(r["selfcheck_done"]),
    )


class UpdateStore:
    """Reads and writes of the update tables on the daemon's :class:`Store` (thread-safe: one connection per
    thread, each write one committed transaction)."""

    def __init__(self, store: Store):
        self.store = store

    def get(self, bundle_id: str) -> UpdateRow | None:
        """The persisted update of ``bundle_id``, or None if the director never named it."""
        rows = self.store.query(f"SELECT {_COLUMNS} FROM model_updates WHERE bundle_id=?", (bundle_id,))
        return _row(rows[0]) if rows else None

    def all(self) -> list[UpdateRow]:
        """Every persisted update, by bundle id."""
        return [_row(r) for r in self.store.query(f"SELECT {_COLUMNS} FROM model_updates ORDER BY bundle_id")]

    def target(self, bundle_id: str, version: str, policy: dict[str, Any], state: UpdateState) -> UpdateRow:
        """The director names ``version`` for ``bundle_id``: a new update starts at ``state`` (progress and
        health bookkeeping reset). Returns the new row."""
        now = time.time()
        with self.store.transaction() as conn:
            conn.execute(
                f"INSERT INTO model_updates({_COLUMNS}) VALUES (?,?,?,0,NULL,NULL,?,?,NULL,NULL,0,0) "
                "ON CONFLICT(bundle_id) DO UPDATE SET target=excluded.target, state=excluded.state, bytes=0, "
                "total=NULL, reason=NULL, since=excluded.since, policy=excluded.policy, from_version=NULL, "
                "health_deadline=NULL, health_ok=0, selfcheck_done=0",
                (bundle_id, version, str(state), now, json.dumps(policy)),
            )
        row = self.get(bundle_id)
        assert row is not None
        return row

    def set_policy(self, bundle_id: str, policy: dict[str, Any]) -> None:
        """The director changed only the rollout policy of the current target."""
        with self.store.transaction() as conn:
            conn.execute("UPDATE model_updates SET policy=? WHERE bundle_id=?", (json.dumps(policy), bundle_id))

    def move(self, row: UpdateRow, state: UpdateState, *, reason: str | None = None, **fields: Any) -> UpdateRow:
        """Persist ``row`` at ``state`` (``reason`` for failed/rolled_back; ``fields`` among bytes, total,
        from_version, health_deadline, health_ok, selfcheck_done), only while it still targets ``row.target``.

        Returns the updated row. Raises :class:`Superseded` if the director has named another version since.
        """
        allowed = {"bytes", "total", "from_version", "health_deadline", "health_ok", "selfcheck_done"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"not update fields: {sorted(unknown)}")
        now = time.time()
        sets = ["state=?", "reason=?", "since=?"] + [f"{k}=?" for k in fields]
        values: list[Any] = [str(state), reason, now, *fields.values()]
        with self.store.transaction() as conn:
            cur = conn.execute(
                f"UPDATE model_updates SET {', '.join(sets)} WHERE bundle_id=? AND target=?",
                (*values, row.bundle_id, row.target),
            )
            if cur.rowcount != 1:
                raise Superseded(row.bundle_id, row.target)
        new = self.get(row.bundle_id)
        assert new is not None
        return new

    def progress(self, row: UpdateRow, done: int, total: int | None) -> None:
        """Download progress (bytes) of the current step; not a state change (``since`` kept)."""
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE model_updates SET bytes=?, total=? WHERE bundle_id=? AND target=?",
                (done, total, row.bundle_id, row.target),
            )

    def count_healthy(self, bundle_id: str, version: str) -> int:
        """One more real study analysed by ``version`` without an engine error while on probation; returns the
        count (0 when ``bundle_id`` is not on probation with that version)."""
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE model_updates SET health_ok=health_ok+1 WHERE bundle_id=? AND target=? AND state=?",
                (bundle_id, version, str(UpdateState.HEALTH_GATE)),
            )
            r = conn.execute(
                "SELECT health_ok FROM model_updates WHERE bundle_id=? AND target=? AND state=?",
                (bundle_id, version, str(UpdateState.HEALTH_GATE)),
            ).fetchone()
        return int(r[0]) if r else 0

    # -- anti-rollback floor -----------------------------------------------------------------------------
    def highest(self, bundle_id: str) -> str | None:
        """The highest version of ``bundle_id`` ever installed on this box (None if none was recorded)."""
        rows = self.store.query("SELECT version FROM model_update_highest WHERE bundle_id=?", (bundle_id,))
        return rows[0]["version"] if rows else None

    def record_installed(self, bundle_id: str, version: str) -> str:
        """Raise the floor to ``version`` if it is higher (semantic versioning order); returns the floor."""
        with self.store.transaction() as conn:
            r = conn.execute("SELECT version FROM model_update_highest WHERE bundle_id=?", (bundle_id,)).fetchone()
            if r is not None and version_key(r[0]) >= version_key(version):
                return str(r[0])
            conn.execute(
                "INSERT INTO model_update_highest(bundle_id, version, recorded_at) VALUES (?,?,?) "
                "ON CONFLICT(bundle_id) DO UPDATE SET version=excluded.version, recorded_at=excluded.recorded_at",
                (bundle_id, version, time.time()),
            )
        return version


class Superseded(Exception):
    """The director named another version while an update was running; the running one stops where it is."""

    def __init__(self, bundle_id: str, target: str):
        self.bundle_id, self.target = bundle_id, target
        super().__init__(f"update of {bundle_id} to {target} superseded by a newer desired version")
