"""De-identification of result records before they leave the box (DICOM PS3.15 Annex E basic profile).

Allowlist, not blocklist: the output is rebuilt field by field from the known schema; any key not listed
here is dropped, and every kept string must match a strict pattern or a closed vocabulary, so PHI that
slipped into an unexpected key or value never leaves. UIDs become keyed pseudonyms (HMAC-SHA256 with the
device secret, rendered as a ``2.25.`` UID): stable for the same study, meaningless without the secret.
Dates are removed (no date-shift): IoT Hub's own enqueued time already tells the central team when a
result arrived. The table of what happens to each field is in docs/CLOUD.md.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
from datetime import date
from pathlib import Path
from typing import Any

from appliance.core.logs import get_logger
from durable import write_atomic

log = get_logger(__name__)

SCHEMA = "result/v1"
FEEDBACK_SCHEMA = "feedback/v1"
MAX_FINDINGS = 256
MAX_IMAGES = 256

# PS3.16 CID 7050 de-identification method codes.
CODE_BASIC_PROFILE = "113100"
CODE_RETAIN_PATIENT_CHARACTERISTICS = "113108"

# Closed vocabularies for DICOM coded strings that are kept (anything else becomes "OTHER").
MODALITIES = {"CR", "DX", "MG", "CT", "MR", "US", "PT", "NM", "XA", "RF", "OT", "PX", "IO", "SC"}
VIEWS = {
    "AP",
    "PA",
    "LL",
    "RL",
    "LAT",
    "LATERAL",
    "AP_SUPINE",
    "PA_ERECT",
    "LLD",
    "RLD",
    "CC",
    "MLO",
    "ML",
    "LM",
    "LMO",
    "XCC",
    "XCCL",
    "XCCM",
    "FB",
    "SIO",
    "TAN",
    "SPOT",
    "MAG",
}
LATERALITIES = {"L", "R", "B", "U"}
SIDES = {"L", "R"}  # a finding's (or place's) patient side, ``postprocess.finding_side`` / ``Location.side``
MAX_PLACES = 4  # places kept per finding (the box marks at most ``postprocess.MAX_PLACES``)
_ID = re.compile(r"^[A-Za-z0-9._+-]{1,64}\Z")
_LABEL = re.compile(r"^[A-Za-z0-9 _.,()/+-]{1,64}\Z")
_PSEUDONYM = re.compile(r"^2\.25\.[0-9]{1,39}\Z")
_MID = re.compile(r"^[A-Za-z0-9-]{1,128}\Z")
_CODE = re.compile(r"^[a-z0-9_]{1,64}\Z")
THRESHOLD_SOURCES = {"manifest", "site"}
VERDICTS = {"agree", "disagree", "uncertain"}
FEEDBACK_KINDS = {"finding", "outcome"}
ROLES = {"viewer", "technician", "admin"}

SECRET_FILE = "device_secret"


def load_or_create_device_secret(secrets_dir: Path) -> bytes:
    """The 32-byte pseudonymisation key (``secrets/device_secret``, 0600), created on first use."""
    secrets_dir.mkdir(parents=True, exist_ok=True)
    path = secrets_dir / SECRET_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        write_atomic(path, os.urandom(32), mode=0o600)  # lost in a power cut, every pseudonym would change
        log.info("device pseudonymisation secret created", path=str(path))
        data = path.read_bytes()
    if len(data) != 32:
        raise ValueError(f"{path}: device secret must be 32 bytes, found {len(data)}")
    return data


def _mac(secret: bytes, *parts: str) -> bytes:
    return hmac.new(secret, "\0".join(parts).encode(), hashlib.sha256).digest()


def pseudonym_uid(secret: bytes, uid: str) -> str:
    """Keyed replacement UID (PS3.15 'U' action): ``2.25.<128-bit integer>``, same input -> same output."""
    return "2.25." + str(int.from_bytes(_mac(secret, "uid", uid)[:16], "big"))


def result_message_id(secret: bytes, result: dict[str, Any]) -> str:
    """Stable message id: the same study (+ revision) + bundle + task always gives the same id, so the cloud
    de-duplicates a re-run; a later revision of the study (late images), or a re-run judged by another site
    operating point (``operating_point_version``), is a new result with a new id. Results judged by the
    manifest's thresholds keep the ids they always had."""
    parts = [str(result.get(k, "")) for k in ("study_uid", "bundle_id", "bundle_version", "task")]
    if result.get("revision") is not None:
        parts.append(f"rev{result['revision']}")
    if result.get("operating_point_version") is not None:  # judged by another site operating point: a new result
        parts.append(f"op{result['operating_point_version']}")
    return "res-" + _mac(secret, "mid", *parts).hex()[:40]


def stats_message_id(secret: bytes, bundle_id: str, bundle_version: str, day: str, generated_at: str) -> str:
    """Message id of one ``stats`` snapshot: keyed HMAC of ("stats", bundle id, version, UTC day, generated_at), so
    each snapshot is its own message and the central store keeps the newest per (device, bundle version, day)."""
    return "sts-" + _mac(secret, "stats", bundle_id, bundle_version, day, generated_at).hex()[:40]


def feedback_message_id(secret: bytes, result_mid: str, label: str | None, kind: str, revision: int) -> str:
    """Stable id of one feedback revision: keyed HMAC of ("feedback", result mid, label or "", kind, revision),
    so a resend is a duplicate the cloud drops and a changed verdict (the next revision) is a new message."""
    return "fb-" + _mac(secret, "feedback", result_mid, label or "", kind, str(revision)).hex()[:40]


def _str(value: Any, pattern: re.Pattern[str], field: str) -> str | None:
    if isinstance(value, str) and pattern.match(value):
        return value
    if value is not None:
        log.warning("de-identification dropped a value that does not match its pattern", field=field)
    return None


def _vocab(value: Any, vocab: set[str]) -> str | None:
    if value is None or value == "":
        return None
    v = str(value).strip().upper()
    return v if v in vocab else "OTHER"


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= 1_000_000 else None


def _uid(secret: bytes, value: Any) -> str | None:
    return pseudonym_uid(secret, value) if isinstance(value, str) and value else None


def _date(value: Any) -> date | None:
    digits = str(value or "").replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def _age_years(birth: Any, study: Any) -> int | None:
    b, s = _date(birth), _date(study)
    if b is None or s is None:
        return None
    age = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
    return min(age, 90) if age >= 0 else None  # ages over 89 are aggregated (HIPAA safe harbor)


def deidentify_result(
    result: dict[str, Any], secret: bytes, retain_patient_characteristics: bool = False
) -> dict[str, Any]:
    """The cloud form of a pipeline result: only allowlisted, validated, de-identified fields."""
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "study_uid": _uid(secret, result.get("study_uid")),
        "modality": _vocab(result.get("modality"), MODALITIES),
        "bundle_id": _str(result.get("bundle_id"), _ID, "bundle_id"),
        "bundle_version": _str(result.get("bundle_version"), _ID, "bundle_version"),
        "task": _str(result.get("task"), _ID, "task"),
        "study_score": _num(result.get("study_score")),
        "per_breast": None,
        "findings": [],
        "images": [],
        "operating_point_version": _int(result.get("operating_point_version")),
    }
    if "revision" in result:  # a later revision of a study (late images) supersedes the earlier result
        out["revision"] = _int(result.get("revision"))
    urgent = result.get("urgent")
    if isinstance(urgent, list) and urgent:  # triage: the labels at or above their urgent threshold
        out["urgent"] = [_str(label, _LABEL, "urgent") for label in urgent[:MAX_FINDINGS]]
    pb = result.get("per_breast")
    if isinstance(pb, dict):
        out["per_breast"] = {side: _num(pb.get(side)) for side in ("L", "R")}
    findings = [f for f in (result.get("findings") or []) if isinstance(f, dict)]
    if len(findings) > MAX_FINDINGS:  # keep the most suspicious ones: the 256 KB message limit is by design
        findings = sorted(findings, key=lambda f: -(_num(f.get("score")) or 0.0))[:MAX_FINDINGS]
        out["truncated_findings"] = len(result["findings"]) - MAX_FINDINGS
    for f in findings:
        loc = f.get("location")
        out["findings"].append(
            {
                "label": _str(f.get("label"), _LABEL, "findings.label"),
                "score": _num(f.get("score")),
                "positive": f.get("positive") if isinstance(f.get("positive"), bool) else None,
                "threshold": _num(f.get("threshold")),
                "threshold_source": f.get("threshold_source")
                if f.get("threshold_source") in THRESHOLD_SOURCES
                else None,
                "image_sop_uid": _uid(secret, f.get("image_sop_uid")),
                "location": {"row": _num(loc.get("row")), "col": _num(loc.get("col"))}
                if isinstance(loc, dict)
                else None,
                # the patient side ("L"/"R") is anatomy, not PHI; every place, as numbers and a side only
                "side": _vocab(f.get("side"), SIDES),
                "locations": [
                    {"row": _num(p.get("row")), "col": _num(p.get("col")), "side": _vocab(p.get("side"), SIDES)}
                    for p in (f.get("locations") or [])[:MAX_PLACES]
                    if isinstance(p, dict)
                ],
            }
        )
    images = [i for i in (result.get("images") or []) if isinstance(i, dict)]
    if len(images) > MAX_IMAGES:
        out["truncated_images"] = len(images) - MAX_IMAGES
        images = images[:MAX_IMAGES]
    for im in images:
        out["images"].append(
            {
                "sop_instance_uid": _uid(secret, im.get("sop_instance_uid")),
                "series_uid": _uid(secret, im.get("series_uid")),
                "rows": _int(im.get("rows")),
                "columns": _int(im.get("columns")),
                "view": _vocab(im.get("view"), VIEWS),
                "laterality": _vocab(im.get("laterality"), LATERALITIES),
            }
        )
    # images of the study the bundle's input gate refused: pseudonym and refusal category only (never the
    # reason text, which may state the patient's age); no finding is ever sent for them
    refused = [i for i in (result.get("not_applied") or []) if isinstance(i, dict)][:MAX_IMAGES]
    if refused:
        out["not_applied"] = [
            {
                "image_sop_uid": _uid(secret, i.get("image_sop_uid")),
                "category": _str(i.get("category"), _LABEL, "not_applied.category"),
            }
            for i in refused
        ]
    codes = [CODE_BASIC_PROFILE]
    if retain_patient_characteristics:
        given = result.get("patient")
        patient: dict[str, Any] = given if isinstance(given, dict) else {}
        sex = patient.get("sex")
        out["patient"] = {
            "sex": sex if sex in ("M", "F", "O") else None,
            "age_years": _age_years(patient.get("birth_date"), result.get("study_date")),
        }
        codes.append(CODE_RETAIN_PATIENT_CHARACTERISTICS)
    out["deidentification"] = {"patient_identity_removed": "YES", "method_codes": codes}
    return out


def deidentify_feedback(feedback: dict[str, Any]) -> dict[str, Any]:
    """The cloud form of one feedback revision (schema ``feedback/v1``, /work/CENTRAL_SCHEMA.md): allowlisted and
    validated like results. ``feedback`` carries ``result_mid`` (the result message's id), ``study`` (the study's
    pseudonym, :func:`pseudonym_uid`: never a UID), ``bundle_id``, ``bundle_version``, ``kind``, ``label``,
    ``verdict``, ``outcome_code``, ``outcome_positive``, ``role`` (the dashboard role, never the user name) and
    ``day`` (the UTC day it was given, a ``datetime.date``; never the study's date). Raises ValueError when an
    identifying or malformed value would have to be dropped from a field the message cannot do without."""
    kind = feedback.get("kind")
    out: dict[str, Any] = {
        "schema": FEEDBACK_SCHEMA,
        "result_mid": _str(feedback.get("result_mid"), _MID, "feedback.result_mid"),
        "study": _str(feedback.get("study"), _PSEUDONYM, "feedback.study"),
        "bundle_id": _str(feedback.get("bundle_id"), _ID, "feedback.bundle_id"),
        "bundle_version": _str(feedback.get("bundle_version"), _ID, "feedback.bundle_version"),
        "kind": kind if kind in FEEDBACK_KINDS else None,
        "label": None,
        "verdict": None,
        "outcome": None,
        "role": feedback.get("role") if feedback.get("role") in ROLES else None,
        "day": feedback["day"].isoformat() if isinstance(feedback.get("day"), date) else None,
    }
    if kind == "finding":
        out["label"] = _str(feedback.get("label"), _LABEL, "feedback.label")
        out["verdict"] = feedback.get("verdict") if feedback.get("verdict") in VERDICTS else None
        required: tuple[str, ...] = ("label", "verdict")
    else:
        code, positive = (
            _str(feedback.get("outcome_code"), _CODE, "feedback.outcome_code"),
            feedback.get("outcome_positive"),
        )
        out["outcome"] = {"code": code, "positive": positive} if code and isinstance(positive, bool) else None
        required = ("outcome",)
    missing = [
        k
        for k in ("result_mid", "study", "bundle_id", "bundle_version", "kind", "role", "day", *required)
        if out[k] is None
    ]
    if missing:
        raise ValueError(f"feedback message cannot be built: no valid {', '.join(missing)}")
    return out
