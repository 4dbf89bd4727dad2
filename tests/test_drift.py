"""Drift measures against hand-computed and tabulated values, and the manifest's ``reference`` / ``drift`` fields:
strictly validated, under the signature, left out of the canonical bytes while unset."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from engines import bundle as B
from engines import drift
from engines.errors import BundleError
from engines.manifest import Manifest, canonical_bytes
from testsupport.bundles import make_bundle, new_key, trust_for
from testsupport.common import ROOT

pytestmark = pytest.mark.unit


def bins(**nonzero: int) -> list[int]:
    """20 counts, zero but for ``b<i>=n``."""
    out = [0] * 20
    for name, n in nonzero.items():
        out[int(name[1:])] = n
    return out


# -- binning ---------------------------------------------------------------------------------------------------------


def test_bins_are_left_closed_with_the_last_one_closed() -> None:
    assert drift.EDGES[0] == 0.0 and drift.EDGES[-1] == 1.0 and len(drift.EDGES) == 21
    # [0, 0.05) is bin 0, 0.05 opens bin 1, 1.0 belongs to the last bin [0.95, 1.0]; outside values are clipped
    assert drift.histogram([0.0, 0.049, 0.05, 0.5, 0.95, 1.0, -3.0, 7.0]) == bins(b0=3, b1=1, b10=1, b19=3)
    with pytest.raises(ValueError):
        drift.histogram([0.2, float("nan")])


# -- PSI ---------------------------------------------------------------------------------------------------------------


def test_psi_of_two_swapped_bins_matches_the_hand_computation() -> None:
    # e = (0.6, 0.4), a = (0.4, 0.6) in two bins, 18 empty bins floored at 1e-4 in both (so they add nothing);
    # after renormalising by S = 1 + 18e-4: PSI = [(0.4-0.6) ln(0.4/0.6) + (0.6-0.4) ln(0.6/0.4)] / S
    expected = (0.2 * math.log(1.5) + 0.2 * math.log(1.5)) / (1 + 18e-4)
    assert drift.psi(bins(b3=60, b4=40), bins(b3=40, b4=60)) == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(0.161895, abs=1e-6)
    assert drift.psi(bins(b3=60, b4=40), bins(b3=6, b4=4)) == pytest.approx(0.0, abs=1e-12)  # same proportions


def test_psi_floors_an_empty_bin_at_epsilon() -> None:
    # e = (0.5, 0.5, 0), a = (0.5, 0, 0.5): bins 1 and 2 are empty on one side each (floored at 1e-4)
    s = 1 + 18e-4
    e1, a1 = 0.5 / s, 1e-4 / s
    expected = 2 * (e1 - a1) * math.log(e1 / a1)
    assert drift.psi(bins(b0=50, b1=50), bins(b0=50, b2=50)) == pytest.approx(expected, rel=1e-9)
    assert 8 < expected < 9  # ln(5000) = 8.52: far beyond any alert threshold, but finite
    with pytest.raises(ValueError, match="empty"):
        drift.psi(bins(), bins(b0=1))


# -- KS ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("x", "q"), [(1.224, 0.10), (1.358, 0.05), (1.628, 0.01), (1.949, 0.001)])
def test_kolmogorov_distribution_matches_the_tabulated_critical_values(x: float, q: float) -> None:
    # Smirnov (1948) / Massey (1951) asymptotic critical values: P(sqrt(n) D > x) = q
    assert drift.kolmogorov_q(x) == pytest.approx(q, rel=0.01)
    assert drift.kolmogorov_q(0.0) == 1.0


def test_binned_ks_of_two_shifted_histograms() -> None:
    d, p = drift.ks_binned(bins(b3=60, b4=40), bins(b3=40, b4=60))
    assert d == pytest.approx(0.2)  # CDFs after bin 3: 0.6 vs 0.4
    ne = 100 * 100 / 200
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * 0.2  # Numerical Recipes 14.3.3
    assert lam == pytest.approx(1.44133, abs=1e-5)  # (7.07107 + 0.12 + 0.01556) * 0.2
    assert p == pytest.approx(drift.kolmogorov_q(lam)) and 0.025 < p < 0.035  # Q(1.44) ~ 0.031
    d, p = drift.ks_binned(bins(b3=60, b4=40), bins(b3=60, b4=40))
    assert d == 0.0 and p == 1.0


def test_an_alert_needs_both_a_large_psi_and_a_small_p_value() -> None:
    # a big shift on few samples: PSI large, p not small enough -> no alert
    few = drift.compare(bins(b3=6, b4=4), bins(b3=4, b4=6, b10=2), psi_alert=0.25, p_alert=0.01)
    assert few["psi"] >= 0.25 and few["p_value"] >= 0.01 and not few["alert"]
    # the same shape on many samples -> alert
    many = drift.compare(bins(b3=600, b4=400), bins(b3=400, b4=600, b10=200), psi_alert=0.25, p_alert=0.01)
    assert many["alert"] and many["test"] == "ks"
    json.dumps(many, allow_nan=False)


def test_reference_distributions_bins_as_the_box_does() -> None:
    rng = np.random.default_rng(3)
    scores = {"nodule": rng.random(40), "effusion": rng.random(40)}
    ref = drift.reference_distributions(scores, rng.random(30), rng.random(40) * 0.5, rng.random(40) * 0.5 + 0.5)
    assert ref["n"] == 30 and ref["score_edges"] == list(drift.EDGES)
    assert ref["scores"]["nodule"] == np.histogram(scores["nodule"], bins=np.linspace(0, 1, 21))[0].tolist()
    assert sum(ref["input_mean"][10:]) == 0 and sum(ref["input_p95"][:10]) == 0
    with pytest.raises(ValidationError, match="effusion"):  # the tiny manifest has no such label
        manifest_with(reference=ref)
    del ref["scores"]["effusion"]
    m = manifest_with(reference=ref)  # a manifest takes it as it is
    assert m.reference is not None and m.reference.scores["nodule"] == ref["scores"]["nodule"]


# -- the manifest ------------------------------------------------------------------------------------------------------


def _doc() -> dict[str, Any]:
    from testsupport.pipeline import tiny_manifest

    return tiny_manifest().model_dump(mode="json")


def good_reference() -> dict[str, Any]:
    return {
        "n": 100,
        "score_edges": list(drift.EDGES),
        "scores": {"nodule": bins(b1=70, b18=30)},
        "study_score": bins(b1=60, b18=40),
        "input_edges": list(drift.EDGES),
        "input_mean": bins(b8=50, b9=50),
        "input_p95": bins(b15=100),
    }


def manifest_with(**fields: Any) -> Manifest:
    return Manifest.model_validate({**_doc(), **fields})


def test_manifests_without_a_reference_keep_their_canonical_bytes() -> None:
    legacy = sorted((ROOT / "tests" / "data" / "legacy-bundles").glob("*.bundle"))  # 1.0.1: before `reference`
    assert len(legacy) == 2
    for path in legacy:
        with tarfile.open(path) as tar:
            raw = tar.extractfile("manifest.json").read()  # type: ignore[union-attr]
        parsed = Manifest.model_validate_json(raw)
        assert parsed.reference is None and parsed.drift is None and canonical_bytes(parsed) == raw
    m = manifest_with(reference=good_reference(), drift={"min_studies": 20})
    raw = canonical_bytes(m)
    assert b'"reference"' in raw and b'"min_studies":20' in raw
    assert m.drift_policy.window_days == 7 and manifest_with(reference=good_reference()).drift_policy.psi_alert == 0.25


def _with(ref: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(ref))
    node = out
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return out


BAD = [
    ("score_edges", list(drift.EDGES)[:20], "edges"),  # 20 edges
    ("score_edges", [0.0, *[0.1] * 19, 1.0], "increasing"),
    ("input_edges", [i / 10 for i in range(21)], "fixed bins"),  # 21 increasing, but not the box's bins
    ("study_score", [1] * 19, "20 counts"),
    ("input_mean", [-1, *[1] * 19], "greater than or equal"),
    ("input_p95", [1.5, *[1] * 19], "integer"),
    ("input_p95", [True, *[1] * 19], "integer"),
    ("scores.nodule", ["1", *[1] * 19], "integer"),
    ("study_score", [0] * 20, "empty"),
    ("n", 0, "greater than or equal"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[f"{p}:{m}" for p, _, m in BAD])
def test_a_reference_of_the_wrong_shape_is_refused(path: str, value: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        manifest_with(reference=_with(good_reference(), path, value))


def test_unknown_labels_nan_and_drift_without_reference_are_refused() -> None:
    ref = good_reference()
    ref["scores"]["pneumothorax"] = bins(b0=1)
    with pytest.raises(ValidationError, match="no scores output has"):
        manifest_with(reference=ref)
    with pytest.raises(ValidationError, match="without a reference"):
        manifest_with(drift={"psi_alert": 0.2})
    for bad in ({"psi_alert": float("nan")}, {"p_alert": 1.5}, {"window_days": 0}, {"min_studies": 2.5}, {"x": 1}):
        with pytest.raises(ValidationError):
            manifest_with(reference=good_reference(), drift=bad)
    raw = canonical_bytes(manifest_with(reference=good_reference())).replace(b'"n":100', b'"n":NaN')
    with pytest.raises(ValueError):
        Manifest.model_validate(json.loads(raw, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c))))


def _resign(src: Path, out: Path, key: Any, edit: Any) -> Path:
    """The bundle at ``src`` with its manifest edited by ``edit(doc)`` and signed again by ``key`` (the signer
    made the mistake: the signature is good, the manifest is not)."""
    with tarfile.open(src) as tar:
        members = {i.name: tar.extractfile(i).read() for i in tar.getmembers()}  # type: ignore[union-attr]
    doc = json.loads(members["manifest.json"])
    edit(doc)
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    members["manifest.json"] = raw
    members["signature"] = json.dumps(
        {"alg": B.SIG_ALG, "key_id": B.key_id(key), "sig": __import__("base64").b64encode(B.sign(key, raw)).decode()},
        sort_keys=True,
    ).encode()
    with tarfile.open(out, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def test_a_signed_bundle_with_a_reference_verifies_and_a_wrong_shape_is_refused(tmp_path: Path) -> None:
    key = new_key()
    ref = good_reference()
    ref["scores"] = {"a": bins(b1=70, b18=30)}
    path = make_bundle(tmp_path, key, reference=ref, drift={"window_days": 3})
    verified = B.verify_bundle(path, trust_for(key)).manifest
    assert verified.reference is not None and verified.reference.scores["a"] == ref["scores"]["a"]
    assert verified.drift_policy.window_days == 3

    def short_counts(doc: dict[str, Any]) -> None:
        doc["reference"]["input_mean"] = doc["reference"]["input_mean"][:19]

    bad = _resign(path, tmp_path / "bad.bundle", key, short_counts)
    with pytest.raises(BundleError) as refused:
        B.verify_bundle(bad, trust_for(key))
    assert refused.value.reason == "bad_manifest" and "input_mean" in str(refused.value)
    ok = _resign(path, tmp_path / "ok.bundle", key, lambda doc: None)  # the same route, unchanged: accepted
    assert B.verify_bundle(ok, trust_for(key)).manifest.reference is not None
