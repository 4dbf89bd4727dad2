"""The pipeline's side of cloud sync: result -> encrypted outbox message, and the cloud agent's hooks.

- :func:`build_cloud_message` maps a stored result summary to the dict ``appliance.cloud.payload`` expects
  and encrypts it (outside any database transaction: crypto must not hold the write lock);
  :func:`enqueue` then queues it in the caller's transaction, the one that records the result.
  The message id is stable (keyed HMAC of study UID + revision + bundle id/version + task), so a re-run
  of the same study revision never makes a new cloud message.
- :func:`agent_hooks` gives the daemon's ``CloudAgent`` its reported properties (active bundles and
  backend) and the ``rollback_model`` and ``resend`` direct methods.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from appliance.cloud import deid, outbox, payload
from appliance.core.config import Settings
from appliance.core.logs import get_logger
from appliance.core.store import Store, now
from appliance.delivery.export import requeue_study
from appliance.models import active as models
from engines.errors import EnginesError

log = get_logger(__name__)


def cloud_result(summary: dict[str, Any], revision: int) -> dict[str, Any]:
    """The pipeline summary (``StudyResult.summary()`` + images) in the cloud payload's input form.

    PHI is carried only where ``deid`` knows to drop or transform it (patient, study date).
    """
    patient = summary.get("patient") or {}
    return {
        "study_uid": summary["study_uid"],
        "revision": revision,
        "modality": summary.get("modality"),
        "bundle_id": summary["bundle_id"],
        "bundle_version": summary["bundle_version"],
        "task": summary["task"],
        "study_score": summary.get("study_score"),
        "per_breast": summary.get("per_breast"),
        "findings": [
            {
                "label": f["label"],
                "score": f["score"],
                "positive": f["positive"],
                "image_sop_uid": f["image_sop_uid"],
                "location": {"row": f["location"]["row"], "col": f["location"]["col"]} if f.get("location") else None,
            }
            for f in summary.get("findings", [])
        ],
        "images": summary.get("images", []),
        "patient": {"sex": patient.get("PatientSex") or None, "birth_date": patient.get("PatientBirthDate") or None},
        "study_date": patient.get("StudyDate") or None,
    }


def build_cloud_message(settings: Settings, summary: dict[str, Any], revision: int) -> tuple[str, bytes] | None:
    """(message id, encrypted body), or None when cloud sync is off. Raises if the payload cannot be built."""
    if not settings.cloud.enabled:
        return None
    secret = deid.load_or_create_device_secret(settings.secrets_dir)
    return payload.build_result_message(cloud_result(summary, revision), settings, secret)


def enqueue(settings: Settings, conn: sqlite3.Connection, message: tuple[str, bytes] | None) -> bool:
    """Queue the message in the caller's transaction; False if there is none or its id is already queued."""
    if message is None:
        return False
    mid, body = message
    c = settings.cloud
    return outbox.enqueue(
        conn, kind="result", message_id=mid, body=body, ttl_s=c.outbox_ttl_days * 86400, max_bytes=c.outbox_max_bytes
    )


def _study_rows(store: Store, settings: Settings, ref: str) -> list[Any]:
    """Results of the study named by its real UID or by its cloud pseudonym (what the central team sees)."""
    secret = deid.load_or_create_device_secret(settings.secrets_dir)
    rows = store.query(
        "SELECT r.id, r.study_id, r.study_uid, r.summary, s.revision FROM results r JOIN studies s ON s.id=r.study_id"
    )
    return [r for r in rows if ref in (r["study_uid"], deid.pseudonym_uid(secret, r["study_uid"]))]


def resend(settings: Settings, store: Store, request: Any) -> tuple[int, Any]:
    """Direct method ``resend``: ``{"study_uid": uid or pseudonym}`` -> PACS export and cloud result again."""
    import json

    ref = request.get("study_uid") if isinstance(request, dict) else None
    if not isinstance(ref, str) or not ref:
        return 400, {"error": 'payload must be {"study_uid": "<study UID or its cloud pseudonym>"}'}
    rows = _study_rows(store, settings, ref)
    if not rows:
        return 404, {"error": "no results for that study on this device"}
    messages = [build_cloud_message(settings, json.loads(r["summary"]), r["revision"]) for r in rows]
    ts = now()
    with store.transaction() as conn:
        exports = 0
        for study_id in sorted({r["study_id"] for r in rows}):
            exports += requeue_study(conn, study_id, ts)
        queued = sum(enqueue(settings, conn, m) for m in messages)
    log.info("resend requested", results=len(rows), exports=exports, cloud_messages=queued)
    return 200, {"results": len(rows), "exports_requeued": exports, "cloud_messages_queued": queued}


def rollback_model(settings: Settings, request: Any) -> tuple[int, Any]:
    """Direct method ``rollback_model``: ``{"bundle_id": id}`` -> the previous version becomes active."""
    bundle_id = request.get("bundle_id") if isinstance(request, dict) else None
    if not isinstance(bundle_id, str) or not bundle_id:
        return 400, {"error": 'payload must be {"bundle_id": "<bundle id>"}'}
    try:
        return 200, models.rollback(settings, bundle_id)
    except EnginesError as exc:
        return (404 if exc.reason == "not_installed" else 409), {"error": str(exc), "reason": exc.reason}


def agent_hooks(settings: Settings, store: Store, engines: models.ActiveEngines | None) -> dict[str, Any]:
    """Keyword arguments for ``CloudAgent``: ``method_hooks`` and ``reported_hook``."""
    hooks: dict[str, Any] = {
        "method_hooks": {
            "rollback_model": lambda req: rollback_model(settings, req),
            "resend": lambda req: resend(settings, store, req),
            "run_selftest": lambda req: run_selftest_method(settings, req),
        }
    }
    if engines is not None:
        hooks["reported_hook"] = engines.describe
    return hooks


def run_selftest_method(settings: Settings, req: Any) -> tuple[int, dict[str, Any]]:
    """Direct method ``run_selftest`` ({"pacs": bool}, optional): 200 and the report, whatever its verdict."""
    from appliance.app.selftest import run_selftest

    pacs = True
    if isinstance(req, dict) and "pacs" in req:
        if not isinstance(req["pacs"], bool):
            return 400, {"error": "'pacs' must be true or false"}
        pacs = req["pacs"]
    elif req not in (None, {}, ""):
        return 400, {"error": 'payload must be an object like {"pacs": false} or empty'}
    return 200, run_selftest(settings, pacs=pacs)
