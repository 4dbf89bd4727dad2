"""The control plane's direct methods that need the whole appliance: ``resend``, ``rollback_model``,
``run_selftest`` (the cloud agent answers ``ping`` and ``get_status`` itself).

Each handler takes the parsed JSON payload and returns ``(status, body)`` as IoT Hub direct methods do
(200 done, 400 bad payload, 404 unknown target, 409 refused); :meth:`ControlMethods.handlers` gives the
agent's ``method_hooks``.
"""

from __future__ import annotations

import json
from typing import Any

from appliance.app.selftest import run_selftest
from appliance.cloud import deid
from appliance.cloud.methods import MethodHandler
from appliance.cloud.result_messages import CloudResultPublisher
from appliance.core.audit import FAILURE, SUCCESS, AuditEvent, record_event
from appliance.core.config import Settings
from appliance.core.logs import get_logger
from appliance.core.store import Store, now
from appliance.delivery.export import requeue_study
from appliance.models import active as models
from engines.errors import EnginesError

log = get_logger(__name__)


class ControlMethods:
    """Direct-method handlers wired by the composition root."""

    def __init__(self, settings: Settings, store: Store, publisher: CloudResultPublisher):
        self._settings = settings
        self._store = store
        self._publisher = publisher

    def handlers(self) -> dict[str, MethodHandler]:
        """Method name -> handler, for ``CloudAgent(method_hooks=...)``."""
        return {"rollback_model": self.rollback_model, "resend": self.resend, "run_selftest": self.run_selftest}

    def _study_rows(self, ref: str) -> list[Any]:
        """Results of the study named by its real UID or by its cloud pseudonym (what the central team sees)."""
        secret = deid.load_or_create_device_secret(self._settings.secrets_dir)
        rows = self._store.query(
            "SELECT r.id, r.study_id, r.study_uid, r.summary, s.revision FROM results r"
            " JOIN studies s ON s.id=r.study_id"
        )
        return [r for r in rows if ref in (r["study_uid"], deid.pseudonym_uid(secret, r["study_uid"]))]

    def resend(self, request: Any) -> tuple[int, Any]:
        """``resend``: ``{"study_uid": uid or pseudonym}`` -> PACS export and cloud result again."""
        ref = request.get("study_uid") if isinstance(request, dict) else None
        if not isinstance(ref, str) or not ref:
            return 400, {"error": 'payload must be {"study_uid": "<study UID or its cloud pseudonym>"}'}
        rows = self._study_rows(ref)
        if not rows:
            return 404, {"error": "no results for that study on this device"}
        messages = [self._publisher.build(json.loads(r["summary"]), r["revision"]) for r in rows]
        ts = now()
        with self._store.transaction() as conn:
            exports = 0
            for study_id in sorted({r["study_id"] for r in rows}):
                exports += requeue_study(conn, study_id, ts)
            queued = sum(self._publisher.enqueue(conn, m) for m in messages)
        self._publisher.committed()
        record_event(
            self._store,
            AuditEvent.STUDY_RESEND,
            actor="cloud",
            subject=",".join(str(i) for i in sorted({r["study_id"] for r in rows})),
            detail={"exports_requeued": exports, "cloud_messages_queued": queued},
        )
        log.info("resend requested", results=len(rows), exports=exports, cloud_messages=queued)
        return 200, {"results": len(rows), "exports_requeued": exports, "cloud_messages_queued": queued}

    def rollback_model(self, request: Any) -> tuple[int, Any]:
        """``rollback_model``: ``{"bundle_id": id}`` -> the previous version becomes active."""
        bundle_id = request.get("bundle_id") if isinstance(request, dict) else None
        if not isinstance(bundle_id, str) or not bundle_id:
            return 400, {"error": 'payload must be {"bundle_id": "<bundle id>"}'}
        try:
            done = models.rollback(self._settings, bundle_id)
        except EnginesError as exc:
            record_event(
                self._store,
                AuditEvent.MODEL_ROLLED_BACK,
                actor="cloud",
                outcome=FAILURE,
                subject=bundle_id,
                detail={"reason": exc.reason},
            )
            return (404 if exc.reason == "not_installed" else 409), {"error": str(exc), "reason": exc.reason}
        record_event(
            self._store,
            AuditEvent.MODEL_ROLLED_BACK,
            actor="cloud",
            subject=f"{bundle_id}@{done['active_version']}",
            detail={"from_version": done["from_version"]},
        )
        return 200, done

    def run_selftest(self, request: Any) -> tuple[int, Any]:
        status, report = run_selftest_method(self._settings, request)
        if status == 200:
            failed = [c["name"] for c in report["checks"] if not c["ok"]]
            outcome = FAILURE if failed else SUCCESS
            record_event(self._store, AuditEvent.SELFTEST, actor="cloud", outcome=outcome, detail={"failed": failed})
        return status, report


def run_selftest_method(settings: Settings, req: Any) -> tuple[int, dict[str, Any]]:
    """Direct method ``run_selftest`` ({"pacs": bool}, optional): 200 and the report, whatever its verdict."""
    pacs = True
    if isinstance(req, dict) and "pacs" in req:
        if not isinstance(req["pacs"], bool):
            return 400, {"error": "'pacs' must be true or false"}
        pacs = req["pacs"]
    elif req not in (None, {}, ""):
        return 400, {"error": 'payload must be an object like {"pacs": false} or empty'}
    return 200, run_selftest(settings, pacs=pacs)
