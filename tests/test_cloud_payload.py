"""De-identification, envelope encryption and the outbox's storage rules (no network)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from appliance.cloud import crypto, deid, outbox, payload
from appliance.core.config import Settings
from appliance.core.store import Store
from testsupport.cloud import PHI_STRINGS, sample_result

SECRET = bytes(range(32))


def _settings(tmp_path: Path, keys: dict[str, str], **cloud) -> Settings:
    return Settings(state_dir=tmp_path, cloud={"device_id": "dev-1", "recipient_keys": keys, **cloud})


def _expected(result: dict) -> dict:
    """The result minus PHI, UIDs replaced by pseudonyms: what the central team must read."""
    p = lambda u: deid.pseudonym_uid(SECRET, u)  # noqa: E731
    return {
        "schema": "result/v1",
        "study_uid": p(result["study_uid"]),
        "modality": result["modality"],
        "bundle_id": result["bundle_id"],
        "bundle_version": result["bundle_version"],
        "task": result["task"],
        "study_score": result["study_score"],
        "per_breast": result["per_breast"],
        # the threshold that judged each finding and its source (manifest | site), CENTRAL_SCHEMA result/v1
        "findings": [
            {
                **f,
                "image_sop_uid": p(f["image_sop_uid"]),
                "threshold": f.get("threshold"),
                "threshold_source": f.get("threshold_source"),
            }
            for f in result["findings"]
        ],
        "operating_point_version": result.get("operating_point_version"),
        "images": [
            {**im, "sop_instance_uid": p(im["sop_instance_uid"]), "series_uid": p(im["series_uid"])}
            for im in result["images"]
        ],
        "deidentification": {"patient_identity_removed": "YES", "method_codes": ["113100"]},
    }


def test_decrypted_payload_is_result_minus_phi_and_no_phi_in_body(tmp_path: Path) -> None:
    priv, pub = crypto.generate_keypair()
    s = _settings(tmp_path, {"central-2025": pub})
    result = sample_result()
    mid, body = payload.build_result_message(result, s, SECRET, recipient_keys=s.cloud.recipient_keys)
    mid2, _ = payload.build_result_message(result, s, SECRET, recipient_keys=s.cloud.recipient_keys)
    assert mid == mid2 and len(mid) <= 128  # stable id
    for phi in PHI_STRINGS:
        assert phi.encode() not in body
    meta, plain = crypto.decrypt(body, {"central-2025": priv})
    assert meta == {"type": "result", "schema": "result/v1", "mid": mid, "device": "dev-1"}
    doc = json.loads(plain)
    assert doc == _expected(result)
    for phi in PHI_STRINGS:
        assert phi.encode() not in plain


def test_retain_patient_characteristics_option_keeps_only_sex_and_age(tmp_path: Path) -> None:
    doc = deid.deidentify_result(sample_result(), SECRET, retain_patient_characteristics=True)
    assert doc["patient"] == {"sex": "F", "age_years": 63}
    assert doc["deidentification"]["method_codes"] == ["113100", "113108"]


def test_phi_in_known_fields_with_wrong_shape_is_dropped() -> None:
    r = sample_result()
    r["images"][0]["view"] = "DOE JANE"  # a name typed into a coded field
    r["findings"][0]["label"] = "DOE^JANE^Q"
    r["bundle_id"] = {"name": "DOE^JANE^Q"}
    r["modality"] = "PID-7781234"
    r["findings"][0]["location"] = {"row": 1, "col": 2, "note": "DOE^JANE^Q"}
    text = json.dumps(deid.deidentify_result(r, SECRET))
    assert "DOE" not in text and "PID-" not in text
    doc = json.loads(text)
    assert doc["images"][0]["view"] == "OTHER" and doc["modality"] == "OTHER" and doc["bundle_id"] is None


def test_several_recipients_rotation_and_tamper_detection(tmp_path: Path) -> None:
    old_priv, old_pub = crypto.generate_keypair()
    new_priv, new_pub = crypto.generate_keypair()
    other_priv, _ = crypto.generate_keypair()
    body = crypto.encrypt(b"secret", {"mid": "m1"}, {"k-old": old_pub, "k-new": new_pub})
    assert crypto.decrypt(body, {"k-old": old_priv})[1] == b"secret"
    assert crypto.decrypt(body, {"k-new": new_priv})[1] == b"secret"
    with pytest.raises(crypto.DecryptError, match="no private key"):
        crypto.decrypt(body, {"k-other": other_priv})
    with pytest.raises(crypto.DecryptError, match="authentication failed"):
        crypto.decrypt(body, {"k-new": other_priv})  # right id, wrong key
    env = json.loads(body)
    env["meta"]["mid"] = "m2"  # metadata is associated data
    with pytest.raises(crypto.DecryptError, match="authentication failed"):
        crypto.decrypt(json.dumps(env).encode(), {"k-new": new_priv})
    with pytest.raises(crypto.DecryptError, match="not an envelope"):
        crypto.decrypt(b"garbage", {"k-new": new_priv})
    with pytest.raises(ValueError, match="no recipient"):
        crypto.encrypt(b"x", {}, {})


def test_worst_case_result_fits_256kb(tmp_path: Path) -> None:
    _, pub = crypto.generate_keypair()
    s = _settings(tmp_path, {f"k{i}": pub for i in range(3)})
    big = sample_result()
    long_uid = "1." + "9" * 62
    big["findings"] = [
        {
            "label": "x" * 64,
            "score": 0.123456789,
            "positive": True,
            "image_sop_uid": long_uid + str(i),
            "location": {"row": 123456.789, "col": 654321.123},
        }
        for i in range(5000)
    ]
    big["images"] = [
        {
            "sop_instance_uid": long_uid + str(i),
            "series_uid": long_uid,
            "rows": 100000,
            "columns": 100000,
            "view": "AP_SUPINE",
            "laterality": "L",
        }
        for i in range(5000)
    ]
    _, body = payload.build_result_message(big, s, SECRET, recipient_keys=s.cloud.recipient_keys)
    assert len(body) <= payload.MAX_BODY_BYTES


def _store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state.db")


def test_outbox_enqueue_is_part_of_callers_transaction(tmp_path: Path) -> None:
    s = _store(tmp_path)
    with pytest.raises(RuntimeError), s.transaction() as c:
        outbox.enqueue(c, kind="result", message_id="r1", body=b"x")
        raise RuntimeError("the study record failed")
    assert outbox.depth(s.conn) == (0, 0)
    with s.transaction() as c:
        assert outbox.enqueue(c, kind="result", message_id="r1", body=b"x")
        assert not outbox.enqueue(c, kind="result", message_id="r1", body=b"x")  # same id: once
    assert outbox.depth(s.conn) == (1, 1)


def test_outbox_order_priority_and_sent(tmp_path: Path) -> None:
    s = _store(tmp_path)
    with s.transaction() as c:
        outbox.enqueue(c, kind="health", message_id="h1", body=b"h")
        for i in range(3):
            outbox.enqueue(c, kind="result", message_id=f"r{i}", body=b"r")
        outbox.enqueue(c, kind="audit", message_id="a1", body=b"a")
    rows = outbox.peek(s.conn, 10)
    assert [r.message_id for r in rows] == ["r0", "r1", "r2", "a1", "h1"]
    assert [r.message_id for r in outbox.peek(s.conn, 2, exclude={rows[0].seq})] == ["r1", "r2"]
    with s.transaction() as c:
        assert outbox.mark_sent(c, [rows[0].seq, rows[1].seq]) == 2
    assert outbox.depth(s.conn)[0] == 3
    assert {r["message_id"] for r in outbox.recent_log(s.conn) if r["outcome"] == "sent"} == {"r0", "r1"}


def test_outbox_rejects_bad_input(tmp_path: Path) -> None:
    s = _store(tmp_path)
    with s.transaction() as c:
        with pytest.raises(ValueError, match="kind"):
            outbox.enqueue(c, kind="spam", message_id="x", body=b"")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="256 KB"):
            outbox.enqueue(c, kind="result", message_id="x", body=b"x" * (256 * 1024 + 1))
        with pytest.raises(ValueError, match="message id"):
            outbox.enqueue(c, kind="result", message_id="m" * 129, body=b"")


def test_outbox_ttl_and_budget_evict_health_first_results_last(tmp_path: Path, caplog) -> None:
    s = _store(tmp_path)
    t0 = 1_000_000.0
    with s.transaction() as c:
        outbox.enqueue(c, kind="result", message_id="old", body=b"r" * 100, ttl_s=10, now=t0)
        for i in range(5):
            outbox.enqueue(c, kind="result", message_id=f"r{i}", body=b"r" * 100, now=t0 + i)
            outbox.enqueue(c, kind="health", message_id=f"h{i}", body=b"h" * 100, now=t0 + i)
            outbox.enqueue(c, kind="audit", message_id=f"a{i}", body=b"a" * 100, now=t0 + i)
    with s.transaction() as c:
        report = outbox.enforce_budget(c, max_bytes=650, now=t0 + 100)
    assert report == {"expired": 1, "evicted_health": 5, "evicted_audit": 4}
    left = [r.message_id for r in outbox.peek(s.conn, 100)]
    assert left == ["r0", "r1", "r2", "r3", "r4", "a4"]
    assert outbox.depth(s.conn) == (6, 600)
    with s.transaction() as c:
        outbox.enforce_budget(c, max_bytes=250, now=t0 + 100)
    assert [r.message_id for r in outbox.peek(s.conn, 100)] == ["r3", "r4"]  # oldest results go last
    assert "evicted oldest messages" in caplog.text and "expired" in caplog.text
    outcomes = {r["message_id"]: r["outcome"] for r in outbox.recent_log(s.conn, 100)}
    assert outcomes["old"] == "expired" and outcomes["h0"] == "evicted" and outcomes["r0"] == "evicted"


def test_device_secret_created_once_0600(tmp_path: Path) -> None:
    a = deid.load_or_create_device_secret(tmp_path / "secrets")
    b = deid.load_or_create_device_secret(tmp_path / "secrets")
    assert a == b and len(a) == 32
    assert (tmp_path / "secrets" / "device_secret").stat().st_mode & 0o777 == 0o600
    assert base64.b64encode(a)  # bytes, not text


def test_identifiers_with_a_trailing_newline_are_dropped() -> None:
    """``$`` matches before a final newline: a bundle id or label ending in one (which could carry a second line
    into a log or a report) must not pass the identifier patterns."""
    r = sample_result()
    r["bundle_id"] = "cxr\n"
    r["findings"][0]["label"] = "nodule\n"
    doc = deid.deidentify_result(r, SECRET)
    assert doc["bundle_id"] is None and doc["findings"][0]["label"] is None
