"""What a cloud message carries: de-identified result -> JSON -> envelope for the central team.

The 256 KB IoT Hub limit holds by construction: the de-identified form has bounded lists (256 findings,
256 images) of bounded fields, no pixel data, and ``build_result_message`` still checks the final size.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from appliance import __version__
from appliance.cloud import crypto, deid
from appliance.core.config import Settings

MAX_MESSAGE_BYTES = 256 * 1024
# Body budget: the property bag (message id, content type, type) takes well under 1 KB.
MAX_BODY_BYTES = MAX_MESSAGE_BYTES - 4 * 1024


class PayloadTooLarge(ValueError):
    """A message body would exceed IoT Hub's 256 KB limit."""


def _check(body: bytes, what: str) -> bytes:
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"{what} message is {len(body)} bytes, over the {MAX_BODY_BYTES}-byte budget")
    return body


def build_result_message(
    result: dict[str, Any], settings: Settings, device_secret: bytes, *, recipient_keys: Mapping[str, str]
) -> tuple[str, bytes]:
    """(stable message id, encrypted body) for one pipeline result; PHI never enters the body.

    ``recipient_keys`` (key id -> base64 X25519 public key) are the ones in force: the settings overlay's
    (:meth:`appliance.cloud.overlay.CloudOverlay.current`), not necessarily the config file's.
    """
    message_id = deid.result_message_id(device_secret, result)
    clean = deid.deidentify_result(result, device_secret, settings.cloud.deid_retain_patient_characteristics)
    plaintext = json.dumps(clean, sort_keys=True, separators=(",", ":")).encode()
    meta = {"type": "result", "schema": deid.SCHEMA, "mid": message_id, "device": settings.cloud.device_id}
    return message_id, _check(crypto.encrypt(plaintext, meta, dict(recipient_keys)), "result")


def build_stats_message(
    doc: dict[str, Any], settings: Settings, device_secret: bytes, *, recipient_keys: Mapping[str, str]
) -> tuple[str, bytes]:
    """(message id, encrypted body) of one ``stats/v1`` snapshot (``appliance.models.stats.snapshot``: counts and
    equipment strings, no patient or study data). Encrypted like results: the counts of a small clinic are
    nobody else's business. Raises ValueError when the document is not strict JSON (a NaN or infinity) or holds a
    count that is not a non-negative integer."""
    check_stats(doc)
    message_id = deid.stats_message_id(
        device_secret, doc["bundle_id"], doc["bundle_version"], doc["day"], doc["generated_at"]
    )
    plaintext = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    meta = {"type": "stats", "schema": doc["schema"], "mid": message_id, "device": settings.cloud.device_id}
    return message_id, _check(crypto.encrypt(plaintext, meta, dict(recipient_keys)), "stats")


def check_stats(doc: dict[str, Any]) -> None:
    """Refuse a ``stats/v1`` document with a non-finite number or a count that is not an int >= 0 (ValueError)."""
    json.dumps(doc, allow_nan=False)  # ValueError on NaN / Infinity anywhere

    def counts(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                counts(v, f"{where}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                counts(v, f"{where}[{i}]")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"stats: {where} is not a count: {value!r}")

    for name in (
        "studies",
        "images",
        "not_analysed",
        "scores",
        "study_score",
        "positives",
        "input_mean",
        "input_p95",
        "inputs",
        "refusals",
    ):
        counts(doc.get(name), name)


def build_feedback_message(
    feedback: dict[str, Any], settings: Settings, device_secret: bytes, *, recipient_keys: Mapping[str, str]
) -> tuple[str, bytes]:
    """(stable message id, encrypted body) for one feedback revision (``deid.deidentify_feedback`` input, plus
    ``revision``); encrypted like results, so not even the labels a radiologist judged travel in the clear."""
    clean = deid.deidentify_feedback(feedback)
    message_id = deid.feedback_message_id(
        device_secret, clean["result_mid"], clean["label"], clean["kind"], int(feedback["revision"])
    )
    plaintext = json.dumps(clean, sort_keys=True, separators=(",", ":")).encode()
    meta = {"type": "feedback", "schema": deid.FEEDBACK_SCHEMA, "mid": message_id, "device": settings.cloud.device_id}
    return message_id, _check(crypto.encrypt(plaintext, meta, dict(recipient_keys)), "feedback")


def build_audit_message(
    event: dict[str, Any], settings: Settings, message_id: str, *, recipient_keys: Mapping[str, str]
) -> tuple[str, bytes]:
    """Audit events may name studies, so they are encrypted like results (the caller de-identifies)."""
    plaintext = json.dumps(event, sort_keys=True, separators=(",", ":")).encode()
    meta = {"type": "audit", "schema": "audit/v1", "mid": message_id, "device": settings.cloud.device_id}
    return message_id, _check(crypto.encrypt(plaintext, meta, dict(recipient_keys)), "audit")


def build_health_message(health: dict[str, Any], settings: Settings) -> tuple[str, bytes]:
    """Health carries no patient data (counts, disk, versions): plain JSON so operations can route on it."""
    ts = time.time()
    message_id = f"health-{settings.cloud.device_id}-{int(ts * 1000)}"
    doc = {"schema": "health/v1", "software_version": __version__, "time": int(ts), **health}
    return message_id, _check(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(), "health")
