"""The shipped reference bundles on ONNX Runtime: they detect and localise on fresh phantoms.

No torch needed: phantoms (numpy) -> manifest preprocessing (train.letterbox) -> the bundle's model.onnx.
"""

from __future__ import annotations

import tarfile

import numpy as np
import onnxruntime as ort
import pytest

from engines.bundle import verify_bundle
from engines.keys import TrustStore, read_public_key_file
from engines.reference import phantoms as P
from training import train as T

REF = T.HERE  # engines/reference: the shipped bundles and the demo key


def _session(kind: str) -> ort.InferenceSession:
    (path,) = (REF / "bundles").glob(f"{kind}-phantom-*.bundle")
    with tarfile.open(path) as tar:
        model = tar.extractfile("model.onnx").read()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def test_geometry_roundtrip_and_subcell_peak() -> None:
    g = T.fit_geometry(320, 256)
    for x, y in [(0.0, 0.0), (100.3, 200.7), (255.0, 319.0)]:
        back = T.to_original(*T.to_input(x, y, g), g)
        assert abs(back[0] - x) < 1e-9 and abs(back[1] - y) < 1e-9
    yy, xx = np.mgrid[0:64, 0:64]
    cx, cy = 20.3, 41.6  # cell coordinates
    hm = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 2.0)
    x_in, y_in, v = T.heatmap_peak(hm)
    assert abs(x_in - (4 * cx + 1.5)) < 1.0 and abs(y_in - (4 * cy + 1.5)) < 1.0 and v > 0.8


def test_reference_bundles_verify_with_demo_key() -> None:
    kid, b64 = read_public_key_file(REF / "keys" / "DEMO-ONLY.pub")
    trust = TrustStore.from_config({kid: b64})
    for path in (REF / "bundles").glob("*.bundle"):
        v = verify_bundle(path, trust)
        assert v.key_id == kid and not v.manifest.clinical_use and "NOT FOR CLINICAL USE" in v.manifest.title


@pytest.mark.integration
def test_cxr_detects_and_localises_nodules() -> None:
    sess = _session("cxr")
    rng = np.random.default_rng(4242)
    data = [T.cxr_sample(9_000_000 + i, rng, augment=False) for i in range(40)]
    scores, heat = sess.run(["scores", "heatmap"], {"image": np.stack([d["x"] for d in data])[:, None]})
    labels = np.stack([d["y"] for d in data])
    for i, name in enumerate(P.CXR_LABELS):
        if 0 < labels[:, i].sum() < len(labels):
            assert T.auc(scores[:, i], labels[:, i]) > 0.8, name
    rel = []
    for d, h in zip(data, heat, strict=True):
        if len(d["points"]) == 1:
            xo, yo = T.to_original(*T.heatmap_peak(h[0])[:2], d["geom"])
            tx, ty = d["points"][0]
            rel.append(np.hypot(xo - tx, yo - ty) / max(d["truth"]["rows"], d["truth"]["columns"]))
    assert len(rel) >= 5
    assert np.median(rel) < 0.02, rel


@pytest.mark.integration
def test_mmg_scores_masses() -> None:
    sess = _session("mmg")
    rng = np.random.default_rng(99)
    data = [T.mmg_sample(8_000_000 + i, rng, augment=False) for i in range(32)]
    scores, heat = sess.run(["scores", "heatmap"], {"image": np.stack([d["x"] for d in data])[:, None]})
    labels = np.stack([d["y"] for d in data])[:, 0]
    assert heat.shape == (32, 1, 64, 64)
    if 0 < labels.sum() < len(labels):
        assert T.auc(scores[:, 0], labels) > 0.8
    else:  # pragma: no cover - the seed gives both classes
        pytest.skip("sample has one class only")
