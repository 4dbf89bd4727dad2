"""Radiologists' feedback and site operating points, in process: the API and pages with their roles, CSRF and
bad input (purged study, unknown label/code, role below ``feedback.min_role``); the de-identified encrypted
``feedback`` message; the OpenAPI schema against the responses; the manifest's ``threshold_range``; signed
operating points in the overlay (range, signer, replay) and postprocess judging by them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from appliance.cloud import crypto, operating_points, outbox
from appliance.cloud.feedback_messages import CloudFeedbackPublisher
from appliance.cloud.operating_points import OperatingPoint
from appliance.cloud.overlay import CloudOverlay
from appliance.cloud.result_messages import CloudResultPublisher
from appliance.cloud.twin import validate
from appliance.core.config import CloudConfig
from appliance.lifecycle import studies
from appliance.pipeline.postprocess import SiteOperatingPoint, image_findings, site_thresholds
from appliance.pipeline.preprocess import Transform
from appliance.pipeline.worker import PipelineWorker, StaticBundles
from appliance.web.accounts import Role
from appliance.web.security import CSRF_HEADER
from engines import keys
from engines.manifest import Manifest, canonical_bytes, check_site_thresholds
from tests.test_web import Box, file_instance
from testsupport.pipeline import TinyEngine, make_dataset, synthetic_image, tiny_manifest

pytestmark = pytest.mark.unit


def ranged_manifest(lo: float = 0.1, hi: float = 0.9) -> Manifest:
    doc = tiny_manifest().model_dump(mode="json")
    for o in doc["outputs"]:
        if o["kind"] == "scores":
            o["threshold_range"] = {o["labels"][0]: [lo, hi]}
    return Manifest.model_validate(doc)


class CloudBox(Box):
    """A :class:`Box` whose studies are published to the cloud outbox, with the feedback publisher wired."""

    def __init__(self, home: Path, **api: Any):
        super().__init__(home, **api)
        self.priv, pub = crypto.generate_keypair()
        self.settings.cloud = CloudConfig(enabled=True, device_id="box-1", recipient_keys={"central-1": pub})
        self.overlay = CloudOverlay(self.settings.cloud, self.store)
        self.ports.feedback_publisher = CloudFeedbackPublisher(self.settings, self.overlay)

    def analysed(self) -> int:
        ds = make_dataset(synthetic_image(300, 240, (100, 120), radius=10))
        sid = file_instance(self.settings, self.store, ds)
        with self.store.transaction() as conn:
            studies.transition(conn, sid, studies.RECEIVED, studies.COMPLETE, "test", completed=True)
        worker = PipelineWorker(self.settings, self.store, StaticBundles([(tiny_manifest(), TinyEngine())]))
        worker.publisher = CloudResultPublisher(self.settings, self.overlay)
        assert worker.process(sid) == studies.INFERRED
        self.ds = ds
        return sid

    def decrypt(self, body: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
        meta, plain = crypto.decrypt(body, {"central-1": self.priv})
        return meta, json.loads(plain)


@pytest.fixture
def cbox(home: Path) -> CloudBox:
    return CloudBox(home)


def _label(box: CloudBox, sid: int) -> str:
    return json.loads(box.store.query("SELECT summary FROM results WHERE study_id=?", (sid,))[0]["summary"])[
        "findings"
    ][0]["label"]


def test_feedback_through_the_api_is_stored_audited_and_queued_de_identified(cbox: CloudBox) -> None:
    sid = cbox.analysed()
    label = _label(cbox, sid)
    c, token = cbox.api_login(Role.VIEWER)
    h = {CSRF_HEADER: token}
    r = c.post(
        f"/api/v1/studies/{sid}/feedback",
        json={"kind": "finding", "bundle_id": "tiny-cxr", "label": label, "verdict": "disagree"},
        headers=h,
    )
    assert r.status_code == 201, r.text
    r2 = c.post(
        f"/api/v1/studies/{sid}/feedback",
        json={"kind": "finding", "bundle_id": "tiny-cxr", "label": label, "verdict": "uncertain"},
        headers=h,
    )
    r3 = c.post(f"/api/v1/studies/{sid}/feedback", json={"kind": "outcome", "outcome_code": "biopsy_benign"}, headers=h)
    assert [r2.status_code, r3.status_code] == [201, 201]
    assert [x["revision"] for x in (r.json()[0], r2.json()[0], r3.json()[0])] == [1, 2, 1]
    got = c.get(f"/api/v1/studies/{sid}/feedback").json()
    assert [(e["verdict"], e["outcome_code"]) for e in got["current"]] == [("uncertain", None), (None, "biopsy_benign")]
    assert len(got["history"]) == 3
    audit = cbox.events("feedback")
    assert len(audit) == 3 and {e.actor for e in audit} == {"viewer"}
    rows = outbox.peek(cbox.store.conn, 50)
    fb = [row for row in rows if row.kind == "feedback"]
    result = next(row for row in rows if row.kind == "result")
    assert len(fb) == 3 and len({row.message_id for row in fb}) == 3
    docs = [cbox.decrypt(row.body) for row in fb]
    result_mid = cbox.decrypt(result.body)[0]["mid"]
    pseudonym = cbox.decrypt(result.body)[1]["study_uid"]
    for meta, doc in docs:
        assert meta["type"] == "feedback" and meta["schema"] == "feedback/v1"
        assert set(doc) == {
            "schema",
            "result_mid",
            "study",
            "bundle_id",
            "bundle_version",
            "kind",
            "label",
            "verdict",
            "outcome",
            "role",
            "day",
        }
        assert doc["result_mid"] == result_mid and doc["study"] == pseudonym and doc["role"] == "viewer"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", doc["day"])
    assert docs[2][1]["outcome"] == {"code": "biopsy_benign", "positive": False}
    text = b"".join(crypto.decrypt(row.body, {"central-1": cbox.priv})[1] for row in fb)
    for value in (
        cbox.ds.StudyInstanceUID,
        cbox.ds.SOPInstanceUID,
        cbox.ds.SeriesInstanceUID,
        str(cbox.ds.PatientID),
        str(cbox.ds.PatientName),
        "viewer@",
    ):
        if value:
            assert str(value).encode() not in text


def test_bad_feedback_is_refused_and_nothing_is_written(cbox: CloudBox, home: Path) -> None:
    sid = cbox.analysed()
    label = _label(cbox, sid)
    c, token = cbox.api_login(Role.VIEWER)
    h = {CSRF_HEADER: token}

    def post(body: dict[str, Any], headers: dict[str, str] | None = h, client: Any = c) -> Any:
        return client.post(f"/api/v1/studies/{sid}/feedback", json=body, headers=headers)

    ok = {"kind": "finding", "bundle_id": "tiny-cxr", "label": label, "verdict": "agree"}
    assert post({**ok, "label": "no-such-label"}).status_code == 400
    assert post({**ok, "verdict": "maybe"}).status_code == 422
    assert post({"kind": "outcome", "outcome_code": "astrology"}).status_code == 400
    assert post({**ok, "bundle_id": "other"}).status_code == 409
    assert post(ok, headers={}).status_code == 403  # no CSRF token
    assert c.post("/api/v1/studies/999/feedback", json=ok, headers=h).status_code == 404
    assert cbox.client().post(f"/api/v1/studies/{sid}/feedback", json=ok).status_code == 401
    strict = CloudBox(home / "strict")
    strict.settings.feedback.min_role = "technician"
    sid2 = strict.analysed()
    vc, vt = strict.api_login(Role.VIEWER)
    assert vc.post(f"/api/v1/studies/{sid2}/feedback", json=ok, headers={CSRF_HEADER: vt}).status_code == 403
    with cbox.store.transaction() as conn:  # retention purged it
        conn.execute("UPDATE studies SET state='purged' WHERE id=?", (sid,))
    refused = post(ok)
    assert refused.status_code == 409 and "purged" in refused.json()["detail"]
    for box in (cbox, strict):
        assert box.store.query("SELECT COUNT(*) FROM feedback")[0][0] == 0
        assert box.events("feedback") == []
        assert [r for r in outbox.peek(box.store.conn, 50) if r.kind == "feedback"] == []


def test_the_study_page_offers_feedback_forms_with_csrf_and_refuses_without(cbox: CloudBox) -> None:
    sid = cbox.analysed()
    label = _label(cbox, sid)
    c, csrf = cbox.page_login(Role.VIEWER)
    page = c.get(f"/studies/{sid}").text
    assert f'id="verdict-{label}-agree"' in page and 'id="outcome_code"' in page and "Biopsy: malignant" in page
    form = {"kind": "finding", "bundle_id": "tiny-cxr", "label": label, "verdict": "agree"}
    assert c.post(f"/studies/{sid}/feedback", data=form).status_code == 403
    r = c.post(f"/studies/{sid}/feedback", data={**form, "csrf_token": csrf})
    # the cloud publisher queued it: "sent to the central team"
    assert r.status_code == 303 and r.headers["location"] == f"/studies/{sid}?msg=feedback_sent"
    bad = c.post(f"/studies/{sid}/feedback", data={**form, "verdict": "nope", "csrf_token": csrf})
    assert bad.status_code == 303 and bad.headers["location"] == f"/studies/{sid}?msg=feedback_invalid"
    assert 'aria-pressed="true"' in c.get(f"/studies/{sid}").text


def _resolve(schema: dict[str, Any], node: Any) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _resolve(schema, schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]])
        return {k: _resolve(schema, v) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(schema, v) for v in node]
    return node


def _conforms(value: Any, s: dict[str, Any]) -> None:
    """A small JSON Schema check of the subset FastAPI emits (type, properties, required, items, anyOf, enum)."""
    if "anyOf" in s:
        errors = []
        for alt in s["anyOf"]:
            try:
                _conforms(value, alt)
                return
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{value!r} matches no alternative: {errors}")
    if "enum" in s:
        assert value in s["enum"], (value, s["enum"])
    if "const" in s:
        assert value == s["const"]
    kind = s.get("type")
    checks = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    if kind in checks:
        assert isinstance(value, checks[kind]), (value, kind)
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), value
    elif kind == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), value
    if kind == "object":
        assert set(s.get("required", [])) <= set(value), (s.get("required"), value)
        for k, v in value.items():
            if k in s.get("properties", {}):
                _conforms(v, s["properties"][k])
    if kind == "array":
        for v in value:
            _conforms(v, s.get("items", {}))


def test_the_openapi_schema_describes_the_feedback_responses(cbox: CloudBox) -> None:
    sid = cbox.analysed()
    c, token = cbox.api_login(Role.VIEWER)
    schema = c.get("/api/v1/openapi.json").json()
    path = schema["paths"]["/api/v1/studies/{ref}/feedback"]
    body = {"kind": "finding", "bundle_id": "tiny-cxr", "label": _label(cbox, sid), "verdict": "agree"}
    posted = c.post(f"/api/v1/studies/{sid}/feedback", json=body, headers={CSRF_HEADER: token})
    got = c.get(f"/api/v1/studies/{sid}/feedback")
    for r, op, code in ((posted, "post", "201"), (got, "get", "200")):
        s = _resolve(schema, path[op]["responses"][code]["content"]["application/json"]["schema"])
        _conforms(r.json(), s)
    assert set(path["post"]["responses"]) >= {"201", "400", "403", "404", "409", "422"}


# -- the manifest's threshold_range ----------------------------------------------------------------------------


def test_threshold_range_is_left_out_of_the_canonical_bytes_while_empty_and_checked_when_set() -> None:
    assert b"threshold_range" not in canonical_bytes(tiny_manifest())
    ranged = ranged_manifest()
    assert b"threshold_range" in canonical_bytes(ranged)
    assert Manifest.model_validate_json(canonical_bytes(ranged)) == ranged
    label = ranged.output("scores").labels[0]  # type: ignore[union-attr]
    doc = tiny_manifest().model_dump(mode="json")
    scores = next(o for o in doc["outputs"] if o["kind"] == "scores")
    for bad, activation in (
        ({"nope": [0.1, 0.9]}, "none"),
        ({label: [0.9, 0.1]}, "none"),
        ({label: [0.0, 1.5]}, "sigmoid"),  # a probability never exceeds 1
        ({label: [0.6, 0.9]}, "none"),  # leaves out the manifest's own threshold (0.3)
    ):
        scores["threshold_range"], scores["activation"] = bad, activation
        with pytest.raises(ValidationError):
            Manifest.model_validate(doc)
    check_site_thresholds(ranged, {label: 0.1})
    check_site_thresholds(ranged, {label: 0.9})
    for thr in ({label: 0.95}, {label: 0.05}, {"nope": 0.5}):
        with pytest.raises(ValueError):
            check_site_thresholds(ranged, thr)


def test_postprocess_judges_by_the_site_threshold_only_within_the_range() -> None:
    m = ranged_manifest(0.1, 0.9)
    spec = m.output("scores")
    assert spec is not None
    label = spec.labels[0]
    assert spec.activation == "none"
    logit = np.full(len(spec.labels), 0.5, dtype=np.float32)  # score 0.5 for every label
    tf = Transform(
        original_shape=(8, 8), target_shape=(8, 8), scale=(1.0, 1.0), offset=(0.0, 0.0), content_shape=(8, 8)
    )
    for site, positive, source in (({label: 0.6}, False, "site"), ({label: 0.4}, True, "site"), ({}, True, "manifest")):
        thr = site_thresholds(m, SiteOperatingPoint(site, 7))
        f = image_findings(logit, spec, None, None, tf, None, thr)[0][0]
        assert (f.positive, f.threshold_source) == (positive, source)
        assert f.threshold == (site[label] if site else spec.threshold(label))
    assert site_thresholds(m, SiteOperatingPoint({label: 0.95}, 8)) == {}  # out of this version's range


# -- signed operating points in the overlay ----------------------------------------------------------------------


def _signed(key: Any, version: int, thr: float, bundle: str = "tiny-cxr", label: str = "a") -> dict[str, Any]:
    op = OperatingPoint(version=version, issued_at=0, site="clinic-7", bundle_id=bundle, thresholds={label: thr})
    return operating_points.sign(op, key)


def test_the_overlay_accepts_only_signed_in_range_newer_operating_points(cbox: CloudBox) -> None:
    central, stranger = keys.generate_private_key(), keys.generate_private_key()
    cbox.settings.cloud.keyset_trusted_keys = {keys.key_id(central): keys.public_key_b64(central)}
    allowed = {"tiny-cxr": ranged_manifest()}

    def check(bundle_id: str, thr: Any) -> None:
        if bundle_id not in allowed:
            raise ValueError(f"no bundle {bundle_id}")
        check_site_thresholds(allowed[bundle_id], dict(thr))

    label = ranged_manifest().output("scores").labels[0]  # type: ignore[union-attr]
    ov = CloudOverlay(cbox.settings.cloud, cbox.store, check_operating_point=check)
    ov.apply(validate({"operating_points": {"tiny-cxr": _signed(central, 2, 0.3, label=label)}}), 1)
    assert ov.current().operating_points["tiny-cxr"].thresholds == {label: 0.3}
    for doc, reason in (
        (_signed(central, 3, 0.95, label=label), "not_allowed"),
        (_signed(central, 3, 0.3, label="nope"), "not_allowed"),
        (_signed(stranger, 3, 0.3, label=label), "unknown_signer"),
        (_signed(central, 1, 0.3, label=label), "replayed"),
        (_signed(central, 2, 0.4, label=label), "replayed"),
        (
            {**_signed(central, 3, 0.3, label=label), "signature": _signed(central, 3, 0.5, label=label)["signature"]},
            "bad_signature",
        ),
    ):
        now = ov.apply(validate({"operating_points": {"tiny-cxr": doc}}), 2)
        assert now.operating_points_refused["tiny-cxr"].startswith(f"operating point refused ({reason})")
        assert ov.current().operating_points["tiny-cxr"].version == 2  # the one in force stays
    now = ov.apply(validate({"operating_points": {"other": _signed(central, 3, 0.3, bundle="other", label=label)}}), 2)
    assert "not_allowed" in now.operating_points_refused["other"] and "other" not in now.operating_points
    with pytest.raises(ValueError, match="given under"):
        validate({"operating_points": {"other": _signed(central, 3, 0.3, label=label)}})
    # remembered across restarts: version 2 is still refused once the twin dropped it
    ov.apply(validate({}), 3)
    again = CloudOverlay(cbox.settings.cloud, cbox.store, check_operating_point=check)
    assert dict(again.current().operating_points) == {}
    refused = again.apply(validate({"operating_points": {"tiny-cxr": _signed(central, 1, 0.3, label=label)}}), 4)
    assert "replayed" in refused.operating_points_refused["tiny-cxr"] and not refused.operating_points
    again.apply(validate({"operating_points": {"tiny-cxr": _signed(central, 2, 0.3, label=label)}}), 4)


def test_a_refused_operating_point_does_not_block_a_key_rotation_in_the_same_desired_document(cbox: CloudBox) -> None:
    """Attack 4: the central team rotates the recipient keys (a signed key set) while the twin still carries an
    operating point this box refuses (a bundle it does not have, a replay, an untrusted signer). Before, the
    whole document was refused: the old recipient key stayed in force; now the key set applies, the refused
    operating point is reported with its reason and the one in force for that bundle stays."""
    import time

    from appliance.app.compose import reported_operating_points
    from appliance.cloud import keysets

    central, stranger = keys.generate_private_key(), keys.generate_private_key()
    cbox.settings.cloud.keyset_trusted_keys = {keys.key_id(central): keys.public_key_b64(central)}
    manifest = ranged_manifest()
    label = manifest.output("scores").labels[0]  # type: ignore[union-attr]

    def check(bundle_id: str, thr: Any) -> None:
        if bundle_id != "tiny-cxr":
            raise ValueError(f"bundle {bundle_id!r} has no active version on this box")
        check_site_thresholds(manifest, dict(thr))

    ov = CloudOverlay(cbox.settings.cloud, cbox.store, check_operating_point=check)
    ov.apply(validate({"operating_points": {"tiny-cxr": _signed(central, 2, 0.3, label=label)}}), 1)
    _, new_pub = crypto.generate_keypair()
    ks = keysets.KeySet(
        version=5, issued_at=int(time.time()), expires_at=int(time.time()) + 86400, keys={"c-2": new_pub}
    )
    for refused_op, reason in (
        (
            {
                "tiny-cxr": _signed(central, 2, 0.3, label=label),
                "not-here": _signed(central, 3, 0.3, bundle="not-here", label=label),
            },
            "not_allowed",
        ),
        ({"tiny-cxr": _signed(central, 1, 0.3, label=label)}, "replayed"),
        ({"tiny-cxr": _signed(stranger, 9, 0.3, label=label)}, "unknown_signer"),
    ):
        now = ov.apply(
            validate(
                {"recipient_keyset": keysets.sign(ks, central), "operating_points": refused_op, "log_level": "INFO"}
            ),
            2,
        )
        assert dict(now.recipient_keys) == {"c-2": new_pub} and now.keyset_version == 5  # the rotation applied
        bundle = sorted(refused_op)[0]
        assert f"({reason})" in now.operating_points_refused[bundle]
        assert now.operating_points["tiny-cxr"].version == 2  # the operating point in force stays
        reported = reported_operating_points(ov.current)
        assert reported["operating_points"]["tiny-cxr"]["version"] == 2
        assert [r["bundle"] for r in reported["operating_points_refused"]] == [bundle]
    ok = ov.apply(validate({"operating_points": {"tiny-cxr": _signed(central, 3, 0.4, label=label)}}), 3)
    assert ok.operating_points["tiny-cxr"].version == 3 and not ok.operating_points_refused
    assert reported_operating_points(ov.current)["operating_points_refused"] is None  # null removes it from the twin


def test_a_refused_operating_point_is_not_persisted_in_place_of_the_one_in_force(cbox: CloudBox) -> None:
    """After a refusal, a restart (or `appliance model list` in another process) reads the persisted overlay: it
    must find the operating point in force, not the refused one (which would then be refused again at start)."""
    central = keys.generate_private_key()
    cbox.settings.cloud.keyset_trusted_keys = {keys.key_id(central): keys.public_key_b64(central)}
    label = ranged_manifest().output("scores").labels[0]  # type: ignore[union-attr]
    ov = CloudOverlay(cbox.settings.cloud, cbox.store)
    ov.apply(validate({"operating_points": {"tiny-cxr": _signed(central, 3, 0.3, label=label)}}), 1)
    now = ov.apply(validate({"operating_points": {"tiny-cxr": _signed(central, 2, 0.5, label=label)}}), 2)
    assert "replayed" in now.operating_points_refused["tiny-cxr"]
    again = CloudOverlay(cbox.settings.cloud, cbox.store)
    assert again.current().operating_points["tiny-cxr"].thresholds == {label: 0.3}
    assert not again.current().operating_points_refused
