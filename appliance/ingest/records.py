"""Instance and study records in ``state.db``: how a received instance is filed under a study revision.

One transaction per instance (``Store.transaction``: BEGIN IMMEDIATE ... COMMIT, fsynced), so a crash
leaves either the whole record or none of it. A study revision collects instances while its state is
``received``; once it is ``complete``, the next new instance opens revision+1.
``studies.assoc_open`` counts the open associations that delivered instances to the revision; it is
reset to 0 at startup because no association survives a restart.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.core.logs import get_logger
from appliance.core.store import Store, now
from appliance.ingest.header import InstanceHeader
from appliance.lifecycle import studies
from appliance.lifecycle.studies import RECEIVED

log = get_logger(__name__)


@dataclass(frozen=True)
class Recorded:
    study_id: int
    instance_id: int
    duplicate: bool  # same SOP Instance UID and same bytes already recorded: nothing new
    new_revision: int | None = None  # set when this instance opened a study revision
    uid_reused: bool = False  # same SOP Instance UID already recorded with different bytes
    other_series: bool = False  # ... and in another series: two images share the UID (both are analysed)


@dataclass(frozen=True)
class InstanceFile:
    """What the pipeline needs to read one instance of a study."""

    instance_id: int
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str | None
    modality: str | None
    transfer_syntax: str
    path: Path
    sha256: str
    flags: str | None


def find_instance(conn: sqlite3.Connection, sop_uid: str, sha256: str) -> sqlite3.Row | None:
    return conn.execute(
        "SELECT id, study_id, path FROM instances WHERE sop_instance_uid=? AND sha256=?", (sop_uid, sha256)
    ).fetchone()


def record_instance(
    store: Store,
    header: InstanceHeader,
    *,
    rel_path: str,
    size: int,
    sha256: str,
    transfer_syntax: str,
    calling_ae: str,
    assoc_studies: set[int],
    on_row: Callable[[int], None] | None = None,
) -> Recorded:
    """File one spool file under its study revision; idempotent on (SOP UID, sha256).

    The row keeps what people need to recognise the study (patient name and ID, accession number, study
    date: ``InstanceHeader``; migration 0011); retention deletes them with the row.

    The same SOP Instance UID with other bytes is kept as a new row flagged ``sop_uid_reused``: in the
    same series it is a correction that replaces the earlier copy for analysis; in another series of the
    study (flag ``sop_uid_in_other_series``) it is a second image and both are analysed
    (:func:`study_instances`).

    ``assoc_studies`` holds the study ids this association already counts in ``assoc_open``; it is
    updated only after the commit. ``on_row(instance_id)`` is called inside the transaction, before
    COMMIT (the durability watermark must know every row before it can become visible).
    """
    ts = now()
    with store.transaction() as conn:
        dup = find_instance(conn, header.sop_instance_uid, sha256)
        if dup is not None:
            return Recorded(study_id=dup["study_id"], instance_id=dup["id"], duplicate=True)
        series_seen = [
            r["series_uid"]
            for r in conn.execute(
                "SELECT DISTINCT series_uid FROM instances WHERE sop_instance_uid=? AND study_uid=?",
                (header.sop_instance_uid, header.study_uid),
            )
        ]
        uid_reused = bool(series_seen) or (
            conn.execute(
                "SELECT 1 FROM instances WHERE sop_instance_uid=? LIMIT 1", (header.sop_instance_uid,)
            ).fetchone()
            is not None
        )
        other_series = any(s != header.series_uid for s in series_seen)
        latest = conn.execute(
            "SELECT id, state, revision FROM studies WHERE study_uid=? ORDER BY revision DESC LIMIT 1",
            (header.study_uid,),
        ).fetchone()
        new_revision = None
        if latest is not None and latest["state"] == RECEIVED:
            study_id = int(latest["id"])
        else:
            new_revision = 1 if latest is None else int(latest["revision"]) + 1
            detail = "first instance" if latest is None else f"late instance re-opened study (was {latest['state']})"
            study_id = studies.open_revision(
                conn, header.study_uid, new_revision, header.modality, calling_ae, detail, ts
            )
        flags = list(header.flags)
        if uid_reused:
            flags.append("sop_uid_reused")
        if other_series:
            flags.append("sop_uid_in_other_series")
        cur = conn.execute(
            "INSERT INTO instances(study_id, study_uid, series_uid, sop_instance_uid, sop_class_uid, transfer_syntax,"
            " modality, path, size, sha256, calling_ae, flags, received_at, patient_name, patient_id, accession_number,"
            " study_date) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                study_id,
                header.study_uid,
                header.series_uid,
                header.sop_instance_uid,
                header.sop_class_uid,
                transfer_syntax,
                header.modality,
                rel_path,
                size,
                sha256,
                calling_ae,
                ",".join(flags) or None,
                ts,
                header.patient_name,
                header.patient_id,
                header.accession_number,
                header.study_date,
            ),
        )
        instance_id = int(cur.lastrowid or 0)  # always set after an INSERT
        if on_row is not None:
            on_row(instance_id)
        opens = 0 if study_id in assoc_studies else 1
        studies.note_instance(conn, study_id, ts, opens, header.modality)
    assoc_studies.add(study_id)
    return Recorded(
        study_id,
        instance_id,
        duplicate=False,
        new_revision=new_revision,
        uid_reused=uid_reused,
        other_series=other_series,
    )


def release_association(store: Store, study_ids: set[int]) -> None:
    """An association ended (released, aborted or dropped): it no longer holds its studies open."""
    if not study_ids:
        return
    with store.transaction() as conn:
        studies.release_associations(conn, study_ids, now())


def forget_instance(store: Store, instance_id: int) -> None:
    """Remove a never-acknowledged instance row (its file did not become durable), and its study
    revision too when that is left without instances. The spool file is left for the startup sweep."""
    with store.transaction() as conn:
        row = conn.execute("SELECT study_id FROM instances WHERE id=?", (instance_id,)).fetchone()
        if row is None:
            return
        conn.execute("DELETE FROM instances WHERE id=?", (instance_id,))
        studies.drop_empty_revision(conn, int(row["study_id"]))


def max_instance_id(store: Store) -> int:
    return int(store.query("SELECT COALESCE(MAX(id), 0) AS m FROM instances")[0]["m"])


def reset_open_associations(store: Store) -> int:
    """At startup no association is open, whatever a crash left behind."""
    with store.transaction() as conn:
        return studies.reset_open_associations(conn)


def forget_study_instances(conn: sqlite3.Connection, study_id: int) -> int:
    """Delete a revision's instance rows in the caller's transaction (retention, after their files went);
    returns how many. A modality re-sending the study later gets it stored and analysed again."""
    return conn.execute("DELETE FROM instances WHERE study_id=?", (study_id,)).rowcount


def known_paths(store: Store) -> set[str]:
    return {r["path"] for r in store.query("SELECT path FROM instances")}


def study_instances(store: Store, spool_root: Path, study_id: int, cumulative: bool = False) -> list[InstanceFile]:
    """The instances of one study revision, in arrival order, with absolute spool paths.

    ``cumulative=True`` returns the whole study as of this revision: the instances of every revision up
    to this one, keeping the newest copy of each image, an image being identified by its (Series Instance
    UID, SOP Instance UID) pair (what a re-run of the study needs). So a re-sent or corrected instance
    (same SOP Instance UID in the same series, other bytes) replaces its earlier copy, while two images
    that share a SOP Instance UID in different series (a modality re-using UIDs, against PS3.3 C.12.1.1.1
    and PS3.5 9: a SOP Instance UID identifies one instance) are both kept and both analysed; the
    pipeline notes the conflict (:func:`appliance.pipeline.uids.shared_sop_uids`). Rows without a Series
    Instance UID (flag ``no_series_uid``) form one series of their own. ``cumulative=False`` lists the
    revision's rows as recorded, every copy.
    """
    cols = "i.id, i.sop_instance_uid, i.sop_class_uid, i.series_uid, i.modality, i.transfer_syntax, i.path,"
    cols += " i.sha256, i.flags"
    if cumulative:
        rows = store.query(
            f"SELECT {cols} FROM instances i JOIN studies s ON s.id=i.study_id"
            " JOIN studies me ON me.id=? AND s.study_uid=me.study_uid AND s.revision<=me.revision"
            " WHERE i.id = (SELECT MAX(j.id) FROM instances j JOIN studies t ON t.id=j.study_id"
            "   WHERE j.sop_instance_uid=i.sop_instance_uid AND j.series_uid IS i.series_uid"
            "   AND t.study_uid=me.study_uid"
            "   AND t.revision<=me.revision)"
            " ORDER BY i.id",
            (study_id,),
        )
    else:
        rows = store.query(f"SELECT {cols} FROM instances i WHERE i.study_id=? ORDER BY i.id", (study_id,))
    return [
        InstanceFile(
            instance_id=r["id"],
            sop_instance_uid=r["sop_instance_uid"],
            sop_class_uid=r["sop_class_uid"],
            series_uid=r["series_uid"],
            modality=r["modality"],
            transfer_syntax=r["transfer_syntax"],
            path=Path(spool_root) / r["path"],
            sha256=r["sha256"],
            flags=r["flags"],
        )
        for r in rows
    ]
