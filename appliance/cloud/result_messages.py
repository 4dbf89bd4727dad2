"""Result -> encrypted outbox message: the cloud side of the pipeline's ``ResultPublisher`` port.

:class:`CloudResultPublisher` maps a stored result summary to the dict :mod:`appliance.cloud.payload` expects
and encrypts it with the recipient keys in force (the settings overlay), outside any database transaction
(crypto must not hold the write lock); :meth:`~CloudResultPublisher.enqueue` then queues it in the caller's
transaction, the one that records the result, and :meth:`~CloudResultPublisher.committed` wakes the sender.
The message id is stable (keyed HMAC of study UID + revision + bundle id/version + task), so a re-run of the
same study revision never makes a new cloud message. A result with an urgent finding (``summary["urgent"]``, the
manifest's triage thresholds) is queued at :data:`~appliance.cloud.outbox.URGENT_RESULT_PRIORITY`, ahead of every
other message; the others at the ordinary result priority.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.cloud import deid, outbox, payload
from appliance.cloud.overlay import CloudOverlay
from appliance.core.config import Settings
from appliance.core.logs import get_logger

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
        "urgent": list(summary.get("urgent") or []),
        "operating_point_version": summary.get("operating_point_version"),
        "findings": [
            {
                "label": f["label"],
                "score": f["score"],
                "positive": f["positive"],
                "threshold": f.get("threshold"),
                "threshold_source": f.get("threshold_source", "manifest"),
                "image_sop_uid": f["image_sop_uid"],
                "location": {"row": f["location"]["row"], "col": f["location"]["col"]} if f.get("location") else None,
            }
            for f in summary.get("findings", [])
        ],
        "images": summary.get("images", []),
        "not_applied": [
            {"image_sop_uid": i.get("image_sop_uid"), "category": i.get("category")}
            for i in summary.get("not_applied") or []
        ],
        "patient": {"sex": patient.get("PatientSex") or None, "birth_date": patient.get("PatientBirthDate") or None},
        "study_date": patient.get("StudyDate") or None,
    }


@dataclass(frozen=True)
class CloudMessage:
    """One encrypted result message, ready to queue: its stable id, its envelope bytes, whether the result is
    urgent (sent first), and the pseudonym the cloud knows the study by (``deid.pseudonym_uid`` of its Study
    Instance UID; the worklist shows it so people can talk with the central team about a study without PHI)."""

    message_id: str
    body: bytes
    urgent: bool = False
    pseudonym: str | None = None


class CloudResultPublisher:
    """Builds and queues result messages for IoT Hub (implements ``appliance.pipeline.results.ResultPublisher``)."""

    def __init__(self, settings: Settings, overlay: CloudOverlay, on_queued: Callable[[], None] = lambda: None):
        """``overlay`` gives the recipient keys and outbox TTL in force; ``on_queued`` (the outbox sender's
        ``notify_queued``) is called after the transaction that queued a message has committed."""
        self._settings = settings
        self._overlay = overlay
        self.on_queued = on_queued  # set by the composition root once the agent's sender exists

    def build(self, summary: dict[str, Any], revision: int) -> CloudMessage:
        """Encrypt one result (``StudyResult.summary()`` + images). Raises ``ValueError`` (e.g.
        ``PayloadTooLarge``) or ``OSError`` (the device secret cannot be read) when it cannot be built."""
        secret = deid.load_or_create_device_secret(self._settings.secrets_dir)
        keys = self._overlay.current().recipient_keys
        mid, body = payload.build_result_message(
            cloud_result(summary, revision), self._settings, secret, recipient_keys=keys
        )
        return CloudMessage(
            mid,
            body,
            urgent=bool(summary.get("urgent")),
            pseudonym=deid.pseudonym_uid(secret, str(summary["study_uid"])),
        )

    def enqueue(self, conn: sqlite3.Connection, message: CloudMessage | None) -> bool:
        """Queue the message in the caller's transaction; False if there is none or its id is already queued."""
        if message is None:
            return False
        return outbox.enqueue(
            conn,
            kind="result",
            message_id=message.message_id,
            body=message.body,
            priority=outbox.URGENT_RESULT_PRIORITY if message.urgent else None,
            ttl_s=self._overlay.current().outbox_ttl_s,
            max_bytes=self._settings.cloud.outbox_max_bytes,
        )

    def committed(self) -> None:
        """The transaction that queued messages has committed: the sender may look now."""
        self.on_queued()
