"""Messages as the box sends them to the central team (issue 17's contract), sealed with the product's own
``appliance.cloud.crypto.encrypt``, and routed records / files as IoT Hub's storage endpoint writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance.cloud import crypto
from testsupport.fakehub.routing import StorageEndpoint, folder_sink, record

EDGES = [round(i * 0.05, 2) for i in range(21)]


def seal(kind: str, schema: str, mid: str, device: str, plaintext: dict[str, Any], pub: str) -> bytes:
    """An envelope exactly as the box makes one: compact sorted JSON plaintext, meta {type, schema, mid, device}."""
    body = json.dumps(plaintext, sort_keys=True, separators=(",", ":")).encode()
    return crypto.encrypt(body, {"type": kind, "schema": schema, "mid": mid, "device": device}, {"central-1": pub})


def result_plaintext(i: int, bundle: tuple[str, str] = ("ref-cxr", "1.0.0")) -> dict[str, Any]:
    """A ``result/v1`` body with the issue-17 fields (threshold, threshold_source, operating point, refusals)."""
    return {
        "schema": "result/v1",
        "study_uid": f"2.25.{1000 + i}",
        "modality": "DX",
        "bundle_id": bundle[0],
        "bundle_version": bundle[1],
        "task": "cxr",
        "study_score": round((i % 100) / 100, 2),
        "per_breast": None,
        "urgent": ["tb"] if i % 10 == 0 else None,
        "operating_point_version": 3 if i % 2 else None,
        "refused_images": [{"image": f"2.25.9{i}", "category": "wrong_body_part"}] if i % 7 == 0 else [],
        "findings": [
            {
                "label": "tb",
                "score": round((i % 100) / 100, 2),
                "positive": (i % 100) >= 50,
                "image_sop_uid": f"2.25.5{i}",
                "location": None,
                "threshold": 0.5,
                "threshold_source": "site" if i % 2 else "manifest",
            }
        ],
        "images": [{"sop_instance_uid": f"2.25.5{i}", "series_uid": "2.25.7", "rows": 2048, "columns": 2048}],
        "deidentification": {"patient_identity_removed": "YES", "method_codes": ["113100"]},
    }


def stats_plaintext(day: str = "2026-03-01", generated_at: str = "2026-03-01T23:00:00Z") -> dict[str, Any]:
    """A ``stats/v1`` body (20-bin histograms, maps, counts) per the contract."""
    hist = [0] * 20
    hist[3], hist[12] = 7, 3
    return {
        "schema": "stats/v1",
        "day": day,
        "generated_at": generated_at,
        "final": True,
        "bundle_id": "ref-cxr",
        "bundle_version": "1.0.0",
        "studies": 10,
        "images": 12,
        "not_analysed": 1,
        "score_edges": EDGES,
        "scores": {"tb": hist},
        "study_score": hist,
        "positives": {"tb": 3},
        "input_edges": EDGES,
        "input_mean": hist,
        "input_p95": hist,
        "inputs": {"manufacturer_model": {"ACME|X1": 12}, "size_band": {"1025-2048": 12}},
        "refusals": {"wrong_body_part": 1},
        "drift": {"score:tb": {"psi": 0.01, "p_value": 0.9, "test": "ks", "alert": False}},
    }


def feedback_plaintext(result_mid: str, kind: str = "finding") -> dict[str, Any]:
    """A ``feedback/v1`` body per the contract."""
    return {
        "schema": "feedback/v1",
        "result_mid": result_mid,
        "study": "2.25.1001",
        "bundle_id": "ref-cxr",
        "bundle_version": "1.0.0",
        "kind": kind,
        "label": "tb" if kind == "finding" else None,
        "verdict": "agree" if kind == "finding" else None,
        "outcome": {"code": "genexpert_positive", "positive": True} if kind == "outcome" else None,
        "role": "viewer",
        "day": "2026-03-02",
    }


def routed(device: str, kind: str, mid: str, body: bytes, enqueued: float) -> dict[str, Any]:
    """The record IoT Hub routes to storage for a message the box published with its usual properties."""
    props = {"$.mid": mid, "$.ct": "application/json", "$.ce": "utf-8", "type": kind}
    return record(device, props, body, enqueued)


def write_routed(folder: Path, records: list[dict[str, Any]], **endpoint: Any) -> list[str]:
    """Route ``records`` through a :class:`StorageEndpoint` into ``folder``; the blob names written."""
    ep = StorageEndpoint(folder_sink(folder), **endpoint)
    try:
        for r in records:
            ep.route(r)
        return ep.flush()
    finally:
        ep.close()
