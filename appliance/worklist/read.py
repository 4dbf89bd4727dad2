"""The worklist read model: what people see of each study (patient, accession, findings, urgency, state) and of
one study in detail (its images, result objects and the timeline of what the box did with it).

Read only: every function takes the open :class:`~appliance.core.store.Store` and queries the tables the owning
modules write (``studies``/``study_events``: lifecycle, ``instances``: ingest, ``results``/``result_objects``:
pipeline, ``exports``: delivery, ``outbox``/``outbox_log``: cloud). Nothing here writes.

Where the fields come from:

- patient name, patient ID, accession number and study date: the newest instance row of the revision
  (``instances``, migration 0011, decoded at receive with the data set's Specific Character Set); for rows
  received before that migration, the ``patient`` block of a result summary. Retention deletes both, so a
  ``purged`` study shows none (its findings stay, without PHI).
- findings: the newest result of each bundle (a retry with an updated bundle replaces the older version's
  findings; ``study_detail`` lists every result), one entry per (bundle, label) with the highest score over
  the study's images; ``urgent`` when a finding reached the bundle manifest's urgent threshold
  (``summary["urgent"]``, see ``docs/BUNDLES.md``).
- pseudonym: the keyed pseudonym of the Study Instance UID the cloud knows the study by
  (``summary["cloud"]["pseudonym"]``), only for studies whose result was queued for the cloud.
- dates: ``since``/``until`` select by the day the box received the study (local time, inclusive).
- timeline: ``study_events`` (every state change), ``exports`` (queued, exported, failing), the outbox and its
  log (queued for the cloud, synced, expired), and the operator's retry/resend requests from the audit trail.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any, TypedDict

from appliance.core import audit
from appliance.core.audit import AuditEvent
from appliance.core.store import MAX_INTEGER, Store
from appliance.lifecycle.studies import STUDY_STATES
from appliance.pipeline import uids
from appliance.worklist.display import finding_text


class StudyNotFound(LookupError):
    """No study matches the reference given to :func:`find_study`."""


class AmbiguousStudy(LookupError):
    """More than one study matches the reference given to :func:`find_study` (a UID suffix too short)."""


class Finding(TypedDict):
    """One label of one bundle on a study: the highest score over its images. ``threshold`` is the bundle's
    operating point (``positive`` = score >= threshold); ``urgent`` = score >= the manifest's urgent threshold."""

    bundle_id: str
    label: str
    score: float
    threshold: float | None
    positive: bool
    urgent: bool
    # the label read per side (the summary's ``reading``, :func:`appliance.pipeline.postprocess.reading`):
    # [{label, side ("L"/"R"/None), score, positive, urgent, views, places}], empty for results made before it
    sides: list[dict[str, Any]]
    text: list[str]  # how it reads, one entry per side (:func:`appliance.worklist.display.finding_text`)


@dataclass(frozen=True)
class StudySummary:
    """One study revision in the worklist (times: seconds since the epoch; ``study_date``: DICOM DA,
    YYYYMMDD as received; ``images``: instances received for this revision, or analysed ones once purged)."""

    id: int
    study_uid: str
    revision: int
    pseudonym: str | None
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None
    modality: str | None
    study_date: str | None
    received_at: float
    updated_at: float
    state: str
    detail: str | None
    calling_ae: str | None
    findings: list[Finding]
    urgent: bool
    images: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return asdict(self)


class ResultObject(TypedDict):
    """A DICOM object the box made (``kind`` "SR" or "SC"), its file relative to the state dir, and whether
    every destination acknowledged it (``exported``; False while any is pending or none was queued)."""

    kind: str
    sop_instance_uid: str
    bundle_id: str
    bundle_version: str
    path: str
    exported: bool


class ImageRow(TypedDict):
    """One received (or analysed) image: its UIDs, laterality/view as the pipeline read them, its findings
    (``{bundle_id, bundle_version, label, score, threshold, positive, urgent}``, every result of the study),
    the result objects made from it (its SCs) and, for an image a bundle's input contract refused, why
    (``not_applied``: ``{bundle_id, bundle_version, category, reason}`` per refusing bundle; never a finding)."""

    sop_instance_uid: str
    series_uid: str | None
    laterality: str | None
    view: str | None
    findings: list[dict[str, Any]]
    objects: list[ResultObject]
    not_applied: list[dict[str, Any]]


class TimelineEntry(TypedDict):
    """One thing that happened to the study: ``at`` seconds since the epoch, ``what`` a short verb phrase
    (a state name, "export queued", "exported", "export failing", "cloud queued", "cloud sent", ...)."""

    at: float
    what: str
    detail: str | None


@dataclass(frozen=True)
class StudyDetail:
    """A study in full: its :class:`StudySummary`, per-image rows, the study-level objects (the SRs), the
    results (bundle, version, study score, created) and the timeline, oldest first."""

    summary: StudySummary
    images: list[ImageRow]
    study_objects: list[ResultObject]
    results: list[dict[str, Any]]
    timeline: list[TimelineEntry]
    export_pending: int = 0
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (the summary nested under ``summary``)."""
        return asdict(self)


# -- the worklist -------------------------------------------------------------------------------------------------


def _day_start(d: date) -> float:
    return datetime.combine(d, dtime.min).timestamp()  # local midnight


def _summaries(conn: sqlite3.Connection, rows: list[sqlite3.Row]) -> list[StudySummary]:
    ids = [int(r["id"]) for r in rows]
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    latest: dict[int, dict[str, dict[str, Any]]] = {}  # study -> bundle id -> its newest result's summary
    for r in conn.execute(
        f"SELECT study_id, bundle_id, summary FROM results WHERE study_id IN ({marks}) ORDER BY id", ids
    ).fetchall():
        try:
            latest.setdefault(int(r["study_id"]), {})[r["bundle_id"]] = json.loads(r["summary"] or "{}")
        except ValueError:
            continue
    results = {sid: list(by_bundle.values()) for sid, by_bundle in latest.items()}
    counts = {
        int(r["study_id"]): int(r["n"])
        for r in conn.execute(
            f"SELECT study_id, COUNT(*) AS n FROM instances WHERE study_id IN ({marks}) GROUP BY study_id", ids
        )
    }
    demo = {sid: r for sid in counts if (r := _last_instance(conn, sid)) is not None}
    return [
        _summary(r, results.get(int(r["id"]), []), demo.get(int(r["id"])), counts.get(int(r["id"]), 0)) for r in rows
    ]


def _last_instance(conn: sqlite3.Connection, study_id: int) -> sqlite3.Row | None:
    """The newest instance of the revision that names a patient (else the newest at all)."""
    return conn.execute(
        "SELECT study_id, patient_name, patient_id, accession_number, study_date FROM instances WHERE study_id=?"
        " ORDER BY (patient_name IS NOT NULL OR patient_id IS NOT NULL) DESC, id DESC LIMIT 1",
        (study_id,),
    ).fetchone()


def _findings(summaries: list[dict[str, Any]]) -> list[Finding]:
    best: dict[tuple[str, str], Finding] = {}
    for s in summaries:
        if s.get("partial"):
            continue
        bundle = str(s.get("bundle_id", ""))
        for f in s.get("findings") or []:
            key = (bundle, str(f.get("label", "")))
            score = float(f.get("score") or 0.0)
            urgent = bool(f.get("urgent"))
            prev = best.get(key)
            if prev is None or score > prev["score"]:
                best[key] = Finding(
                    bundle_id=bundle,
                    label=key[1],
                    score=score,
                    threshold=f.get("threshold"),
                    positive=bool(f.get("positive")) or bool(prev and prev["positive"]),
                    urgent=urgent or bool(prev and prev["urgent"]),
                    sides=[],
                    text=[],
                )
            else:
                prev["positive"] = prev["positive"] or bool(f.get("positive"))
                prev["urgent"] = prev["urgent"] or urgent
    for s in summaries:
        if s.get("partial"):
            continue
        mammo = str(s.get("modality") or "").upper() == "MG" or s.get("per_breast") is not None
        for r in s.get("reading") or []:
            got = best.get((str(s.get("bundle_id", "")), str(r.get("label", ""))))
            if got is not None:
                got["sides"].append(dict(r))
                got["text"].append(finding_text(r, mammo))
    for f in best.values():
        if not f["text"]:
            f["text"] = [finding_text({"label": f["label"], "score": f["score"], "side": None, "views": []}, False)]
    return sorted(best.values(), key=lambda f: (not f["urgent"], not f["positive"], -f["score"], f["label"]))


def _summary(row: sqlite3.Row, results: list[dict[str, Any]], inst: sqlite3.Row | None, count: int) -> StudySummary:
    patient: dict[str, Any] = next((s["patient"] for s in results if s.get("patient")), {})
    pseudonym = next(((s.get("cloud") or {}).get("pseudonym") for s in results if s.get("cloud")), None)

    def pick(column: str, key: str) -> str | None:
        value = inst[column] if inst is not None else None
        return value or (str(patient.get(key) or "") or None)

    findings = _findings(results)
    analysed = max((len(s.get("images") or []) for s in results), default=0)
    return StudySummary(
        id=int(row["id"]),
        study_uid=row["study_uid"],
        revision=int(row["revision"]),
        pseudonym=pseudonym,
        patient_name=pick("patient_name", "PatientName"),
        patient_id=pick("patient_id", "PatientID"),
        accession_number=pick("accession_number", "AccessionNumber"),
        modality=row["modality"],
        study_date=pick("study_date", "StudyDate"),
        received_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        state=row["state"],
        detail=row["detail"],
        calling_ae=row["calling_ae"],
        findings=findings,
        urgent=any(f["urgent"] for f in findings),
        images=count or analysed,
    )


_STUDY_COLUMNS = (
    "s.id, s.study_uid, s.revision, s.state, s.detail, s.modality, s.calling_ae, s.created_at, s.updated_at"
)


# a study with an urgent finding in a complete result (what ``StudySummary.urgent`` shows): listed first
_URGENT = (
    "EXISTS (SELECT 1 FROM results r WHERE r.study_id = s.id AND json_array_length(r.summary, '$.urgent') > 0"
    " AND NOT coalesce(json_extract(r.summary, '$.partial'), 0))"
)


def list_studies(
    store: Store,
    *,
    since: date | None = None,
    until: date | None = None,
    state: str | None = None,
    finding: str | None = None,
    urgent_only: bool = False,
    limit: int = 200,
) -> list[StudySummary]:
    """Study revisions, urgent ones first (an urgent finding in a complete result), then newest received
    first, at most ``limit``.

    ``since``/``until``: the local day the box received the study, inclusive. ``state``: one of
    ``lifecycle.studies.STUDY_STATES``. ``finding``: only studies with a *positive* finding of that label
    (case-insensitive, any bundle). ``urgent_only``: only studies flagged urgent. Raises ``ValueError`` for
    an unknown state, a non-positive limit or ``since`` after ``until``.
    """
    if state is not None and state not in STUDY_STATES:
        raise ValueError(f"unknown state {state!r}; one of: {', '.join(STUDY_STATES)}")
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if since is not None and until is not None and since > until:
        raise ValueError(f"--since {since} is after --until {until}")
    where: list[str] = []
    params: list[Any] = []
    if since is not None:
        where.append("s.created_at >= ?")
        params.append(_day_start(since))
    if until is not None:
        where.append("s.created_at < ?")
        params.append(_day_start(until + timedelta(days=1)))
    if state is not None:
        where.append("s.state = ?")
        params.append(state)
    if finding:
        where.append(
            "EXISTS (SELECT 1 FROM results r, json_each(r.summary, '$.findings') f WHERE r.study_id = s.id"
            " AND lower(json_extract(f.value, '$.label')) = lower(?) AND json_extract(f.value, '$.positive'))"
        )
        params.append(finding)
    if urgent_only:
        where.append(
            "EXISTS (SELECT 1 FROM results r WHERE r.study_id = s.id AND json_array_length(r.summary, '$.urgent') > 0)"
        )
    sql = f"SELECT {_STUDY_COLUMNS} FROM studies s"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {_URGENT} DESC, s.created_at DESC, s.id DESC LIMIT ?"
    conn = store.conn
    rows = conn.execute(sql, (*params, limit)).fetchall()
    return _summaries(conn, rows)


# -- one study ----------------------------------------------------------------------------------------------------


MIN_BARE_UID_END = 8  # digits only and shorter than this: an id, never the end of a UID (`appliance studies` shows 9)


def find_study(store: Store, ref: str) -> int:
    """The id of the study revision ``ref`` names: a numeric id (ASCII digits only, when such a row exists), a full
    Study Instance UID or a suffix of one that only one study has (``...4.5678``; a leading "..." or "…" marks
    it as a suffix). Digits alone, shorter than ``MIN_BARE_UID_END`` and not an existing id, are refused: a
    mistyped id never names another study whose UID happens to end in those digits. A UID with several revisions
    gives its newest. Raises :class:`StudyNotFound` or
    :class:`AmbiguousStudy` (both ``LookupError``) with a message naming the reference."""
    ref = ref.strip()
    uid_end = False
    for ellipsis in ("...", "…"):  # as `appliance studies` prints the end of a UID
        if ref.startswith(ellipsis):
            ref, uid_end = ref[len(ellipsis) :], True
    if not ref:
        raise StudyNotFound("empty study reference")
    conn = store.conn
    if (
        ref.isascii() and ref.isdigit() and not uid_end and int(ref) <= MAX_INTEGER
    ):  # not "²" (isdigit, not int) nor 2**64
        row = conn.execute("SELECT id FROM studies WHERE id=?", (int(ref),)).fetchone()
        if row is not None:
            return int(row["id"])
        if len(ref) < MIN_BARE_UID_END:  # a mistyped id must not pick whichever study's UID ends in it
            raise StudyNotFound(
                f"no study with id {ref} (the end of a Study Instance UID: at least {MIN_BARE_UID_END} characters,"
                f" or start it with …)"
            )
    row = conn.execute("SELECT id FROM studies WHERE study_uid=? ORDER BY revision DESC LIMIT 1", (ref,)).fetchone()
    if row is not None:
        return int(row["id"])
    pattern = "%" + ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    found = [
        r["study_uid"]
        for r in conn.execute(
            "SELECT DISTINCT study_uid FROM studies WHERE study_uid LIKE ? ESCAPE '\\' LIMIT 6", (pattern,)
        )
    ]
    if not found:
        raise StudyNotFound(f"no study matches {ref!r} (give the id, the Study Instance UID or its end)")
    if len(found) > 1:
        more = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise AmbiguousStudy(f"{ref!r} matches several studies ({more}); give more of the UID or the id")
    row = conn.execute(
        "SELECT id FROM studies WHERE study_uid=? ORDER BY revision DESC LIMIT 1", (found[0],)
    ).fetchone()
    return int(row["id"])


def _relative(path: str, state_dir: Path) -> str:
    p = Path(path)
    try:
        return str(p.relative_to(state_dir))
    except ValueError:
        return str(p)


def study_detail(store: Store, study_id: int) -> StudyDetail:
    """Everything about one study revision. Object paths are relative to the state dir (the store's
    directory). Raises :class:`StudyNotFound` when there is no such id."""
    conn = store.conn
    row = conn.execute(f"SELECT {_STUDY_COLUMNS} FROM studies s WHERE s.id=?", (study_id,)).fetchone()
    if row is None:
        raise StudyNotFound(f"no study with id {study_id}")
    summary = _summaries(conn, [row])[0]
    state_dir = store.path.parent
    result_rows = conn.execute(
        "SELECT id, bundle_id, bundle_version, summary, study_score, created_at FROM results WHERE study_id=?"
        " ORDER BY id",
        (study_id,),
    ).fetchall()
    parsed: list[tuple[sqlite3.Row, dict[str, Any]]] = []
    for r in result_rows:
        try:
            parsed.append((r, json.loads(r["summary"] or "{}")))
        except ValueError:
            parsed.append((r, {}))
    objects = conn.execute(
        "SELECT o.id, o.kind, o.sop_instance_uid, o.path, r.bundle_id, r.bundle_version,"
        " (SELECT COUNT(*) FROM exports e WHERE e.object_id=o.id) AS queued,"
        " (SELECT COUNT(*) FROM exports e WHERE e.object_id=o.id AND e.state='done') AS done"
        " FROM result_objects o JOIN results r ON r.id=o.result_id WHERE r.study_id=? ORDER BY o.id",
        (study_id,),
    ).fetchall()
    by_uid: dict[str, ResultObject] = {}
    for o in objects:
        by_uid[o["sop_instance_uid"]] = ResultObject(
            kind=o["kind"],
            sop_instance_uid=o["sop_instance_uid"],
            bundle_id=o["bundle_id"],
            bundle_version=o["bundle_version"],
            path=_relative(o["path"], state_dir),
            exported=bool(o["queued"]) and o["queued"] == o["done"],
        )

    images: dict[tuple[str | None, str], ImageRow] = {}
    for i in conn.execute(
        "SELECT sop_instance_uid, series_uid FROM instances WHERE study_id=? ORDER BY id", (study_id,)
    ).fetchall():
        key = (i["series_uid"], i["sop_instance_uid"])
        images.setdefault(
            key,
            ImageRow(
                sop_instance_uid=key[1],
                series_uid=key[0],
                laterality=None,
                view=None,
                findings=[],
                objects=[],
                not_applied=[],
            ),
        )
    used: set[str] = set()
    for r, s in parsed:
        for img in s.get("images") or []:
            key = (img.get("series_uid"), str(img.get("sop_instance_uid")))
            entry = images.setdefault(
                key,
                ImageRow(
                    sop_instance_uid=key[1],
                    series_uid=key[0],
                    laterality=None,
                    view=None,
                    findings=[],
                    objects=[],
                    not_applied=[],
                ),
            )
            entry["laterality"] = entry["laterality"] or img.get("laterality")
            entry["view"] = entry["view"] or img.get("view")
            sc = uids.sc_instance_uid(row["study_uid"], key[0], key[1], r["bundle_id"], r["bundle_version"])
            if sc in by_uid:
                entry["objects"].append(by_uid[sc])
                used.add(sc)
        for na in s.get("not_applied") or []:
            key = (na.get("image_series_uid"), str(na.get("image_sop_uid")))
            if key in images:
                images[key]["not_applied"].append(
                    {
                        "bundle_id": r["bundle_id"],
                        "bundle_version": r["bundle_version"],
                        "category": na.get("category"),
                        "reason": na.get("reason"),
                    }
                )
        for f in s.get("findings") or []:
            key = (f.get("image_series_uid"), str(f.get("image_sop_uid")))
            if key in images:
                images[key]["findings"].append(
                    {
                        "bundle_id": r["bundle_id"],
                        "bundle_version": r["bundle_version"],
                        "label": f.get("label"),
                        "score": f.get("score"),
                        "threshold": f.get("threshold"),
                        "positive": bool(f.get("positive")),
                        "urgent": bool(f.get("urgent")),
                    }
                )
    study_objects = [o for uid, o in by_uid.items() if uid not in used]
    pending = int(
        conn.execute("SELECT COUNT(*) FROM exports WHERE study_id=? AND state!='done'", (study_id,)).fetchone()[0]
    )
    problems = [
        f"SC not built for image {e.get('image_sop_uid')}: {e.get('error')}"
        for _, s in parsed
        for e in s.get("object_errors") or []
    ]
    return StudyDetail(
        summary=summary,
        images=list(images.values()),
        study_objects=study_objects,
        results=[
            {
                "bundle_id": r["bundle_id"],
                "bundle_version": r["bundle_version"],
                "study_score": r["study_score"],
                "created_at": r["created_at"],
                "partial": bool(s.get("partial")),
                "urgent": list(s.get("urgent") or []),
            }
            for r, s in parsed
        ],
        timeline=_timeline(store, study_id, [s for _, s in parsed]),
        export_pending=pending,
        problems=problems,
    )


# operator actions on the study from the audit trail (viewing it is audited too, but is not something done *to* it)
_AUDITED = {AuditEvent.STUDY_RETRY.value: "retry requested", AuditEvent.STUDY_RESEND.value: "resend requested"}


def _timeline(store: Store, study_id: int, summaries: list[dict[str, Any]]) -> list[TimelineEntry]:
    conn = store.conn
    out: list[TimelineEntry] = []
    for e in conn.execute(
        "SELECT from_state, to_state, at, detail FROM study_events WHERE study_id=? ORDER BY at, id", (study_id,)
    ):
        move = f"{e['from_state']} -> {e['to_state']}" if e["from_state"] else None
        detail = "; ".join(x for x in (move, e["detail"]) if x) or None
        out.append(TimelineEntry(at=float(e["at"]), what=e["to_state"], detail=detail))
    for q in conn.execute(
        "SELECT e.destination, e.created_at, COUNT(*) AS n, GROUP_CONCAT(o.kind) AS kinds FROM exports e"
        " JOIN result_objects o ON o.id=e.object_id WHERE e.study_id=? GROUP BY e.destination, e.created_at",
        (study_id,),
    ):
        kinds = sorted(str(q["kinds"] or "").split(","))
        listing = ", ".join(f"{k} x{kinds.count(k)}" if kinds.count(k) > 1 else k for k in sorted(set(kinds)))
        out.append(
            TimelineEntry(
                at=float(q["created_at"]),
                what="export queued",
                detail=f"{q['n']} object(s) ({listing}) for {q['destination']}",
            )
        )
    for x in conn.execute(
        "SELECT e.destination, e.state, e.attempts, e.done_at, e.next_attempt_at, e.last_error, o.kind,"
        " o.sop_instance_uid FROM exports e JOIN result_objects o ON o.id=e.object_id WHERE e.study_id=? ORDER BY e.id",
        (study_id,),
    ):
        if x["state"] == "done" and x["done_at"] is not None:
            out.append(
                TimelineEntry(at=float(x["done_at"]), what="exported", detail=f"{x['kind']} to {x['destination']}")
            )
        elif x["attempts"]:
            out.append(
                TimelineEntry(
                    at=float(x["next_attempt_at"]),
                    what="export failing",
                    detail=f"{x['kind']} to {x['destination']}: {x['attempts']} attempt(s), next at this time;"
                    f" last error: {x['last_error']}",
                )
            )
    for entry in audit.query(store, subject=f"study:{study_id}", newest_first=False):
        if entry.event in _AUDITED:
            at = datetime.fromisoformat(entry.time).timestamp()
            out.append(TimelineEntry(at=at, what=_AUDITED[entry.event], detail=f"by {entry.actor}"))
    mids = [
        str((s.get("cloud") or {}).get("message_id")) for s in summaries if (s.get("cloud") or {}).get("message_id")
    ]
    for mid in mids:
        for q in conn.execute("SELECT created_at, priority FROM outbox WHERE message_id=?", (mid,)):
            out.append(
                TimelineEntry(at=float(q["created_at"]), what="cloud queued", detail=f"priority {q['priority']}")
            )
        for g in conn.execute("SELECT created_at, outcome, at FROM outbox_log WHERE message_id=?", (mid,)):
            out.append(TimelineEntry(at=float(g["created_at"]), what="cloud queued", detail=None))
            what = {"sent": "cloud synced", "expired": "cloud message expired", "evicted": "cloud message evicted"}
            out.append(TimelineEntry(at=float(g["at"]), what=what.get(g["outcome"], g["outcome"]), detail=None))
    out.sort(key=lambda t: t["at"])
    return out
