"""Compile, cache, golden check and backends, on real ONNX Runtime with tiny real ONNX models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engines import runtime
from engines.backends import select_backend
from engines.backends.ort import OrtEngine
from engines.cache import EngineCache
from engines.errors import BundleError, EngineBuildError, GoldenCheckError
from engines.golden import compare
from engines.registry import Registry
from testsupport.bundles import SIZE, make_bundle, new_key, trust_for

ORT = runtime.EngineOptions(backend="ort", plugins={"ort": {"intra_op_threads": 1}})


@pytest.fixture
def setup(tmp_path):
    key = new_key()
    trust = trust_for(key)
    models = tmp_path / "models"
    return key, trust, models


def test_install_activate_and_infer(setup, tmp_path) -> None:
    key, trust, models = setup
    runtime.install_bundle(models, make_bundle(tmp_path, key), trust, ORT)
    assert Registry(models, trust).active_version("tiny") == "1.0.0"
    res = runtime.compile_engine(models, "tiny", ORT, trust=trust)
    eng = res.engine
    assert res.cache_hit, "install already compiled it: the second load comes from the cache"
    assert res.golden.passed and eng.backend_name == "ort" and eng.max_batch == 8
    x = np.ones((3, 1, SIZE, SIZE), np.float32)
    out = eng.infer({"image": x})
    assert out["heatmap"].shape == (3, 2, 4, 4) and out["scores"].shape == (3, 2)
    np.testing.assert_allclose(out["scores"][:, 0], 1 / (1 + np.exp(-1.0)), rtol=1e-5)
    eng.close()


def test_corrupt_cache_entry_is_rebuilt(setup, tmp_path) -> None:
    key, trust, models = setup
    runtime.install_bundle(models, make_bundle(tmp_path, key), trust, ORT)
    (entry,) = EngineCache(models / "cache").entries()
    art = models / "cache" / "tiny" / entry["path"].split("/")[-1] / "artefact"
    art.write_bytes(b"garbage, not an onnx model")
    res = runtime.compile_engine(models, "tiny", ORT, trust=trust)
    assert not res.cache_hit and "corrupt" in res.cache_note and res.golden.passed
    res.engine.close()
    # entry.json unreadable: same story
    (art.parent / "entry.json").write_text("{")
    res = runtime.compile_engine(models, "tiny", ORT, trust=trust)
    assert not res.cache_hit and res.golden.passed
    res.engine.close()
    # a valid-looking entry whose artefact the backend cannot load (checksum updated to match)
    import hashlib

    art.write_bytes(b"still not a model")
    doc = json.loads((art.parent / "entry.json").read_text())
    doc["artefact_sha256"] = hashlib.sha256(b"still not a model").hexdigest()
    (art.parent / "entry.json").write_text(json.dumps(doc))
    res = runtime.compile_engine(models, "tiny", ORT, trust=trust)
    assert not res.cache_hit and "unusable" in res.cache_note and res.golden.passed
    res.engine.close()


def test_golden_mismatch_never_activated(setup, tmp_path) -> None:
    key, trust, models = setup
    runtime.install_bundle(models, make_bundle(tmp_path, key, version="1.0.0"), trust, ORT)
    bad = make_bundle(tmp_path, key, version="1.1.0", gain=1.0, golden_gain=1.5)
    with pytest.raises(GoldenCheckError) as ei:
        runtime.install_bundle(models, bad, trust, ORT)
    assert ei.value.reason == "golden_mismatch" and "tiny@1.1.0" in str(ei.value)
    assert ei.value.report["outputs"][0]["max_abs_diff"] > 0.01
    reg = Registry(models, trust)
    assert reg.active_version("tiny") == "1.0.0"
    assert reg.state("tiny")["failures"]["1.1.0"]["reason"] == "golden_mismatch"
    with pytest.raises(BundleError) as e2:
        reg.activate("tiny", "1.1.0")
    assert e2.value.reason == "failed_check"
    assert not [e for e in EngineCache(models / "cache").entries() if e.get("bundle") == "tiny@1.1.0"]


def test_unloadable_onnx_names_the_bundle(setup, tmp_path) -> None:
    key, trust, models = setup
    # a syntactically valid bundle whose model.onnx is not an ONNX model
    from engines import bundle as B
    from testsupport.bundles import manifest_doc

    work = tmp_path / "w"
    work.mkdir()
    (work / "model.onnx").write_bytes(b"\x08\x07 definitely not protobuf of a model")
    good = make_bundle(tmp_path, key)
    import tarfile

    with tarfile.open(good) as t:
        (work / "golden.npz").write_bytes(t.extractfile("golden.npz").read())
    path = tmp_path / "broken.bundle"
    B.build_bundle(
        path, manifest_doc("broken", "1.0.0"), {"model.onnx": work / "model.onnx", "golden.npz": work / "golden.npz"}
    )
    B.sign_bundle(path, key)
    # verification parses the model (to check its external data references) before any backend sees it
    with pytest.raises(BundleError) as ei:
        runtime.install_bundle(models, path, trust, ORT)
    assert ei.value.reason == "bad_model"
    assert "broken@1.0.0" in str(ei.value) and "not an ONNX model" in str(ei.value)
    assert Registry(models, trust).state("broken")["installed"] == {}
    assert Registry(models, trust).active_version("broken") is None


def test_load_engine_refuses_tampered_install(setup, tmp_path) -> None:
    key, trust, models = setup
    runtime.install_bundle(models, make_bundle(tmp_path, key), trust, ORT)
    reg = Registry(models, trust)
    (reg.version_dir("tiny") / "golden.npz").write_bytes(b"x")
    with pytest.raises(BundleError) as ei:
        runtime.load_engine(models, "tiny", ORT, trust=trust)
    assert ei.value.reason == "hash_mismatch"


def test_compare_is_polygraphy_style() -> None:
    e = np.array([1.0, 100.0])
    # 100 -> 100.5: abs 0.5 > atol 0.1 but rel 0.005 <= rtol 0.01 -> passes (must exceed BOTH)
    assert compare("x", np.array([1.05, 100.5]), e, atol=0.1, rtol=0.01).passed
    r = compare("x", np.array([1.5, 100.0]), e, atol=0.1, rtol=0.01)
    assert not r.passed and r.mismatched == 1 and abs(r.max_abs_diff - 0.5) < 1e-9
    assert not compare("x", np.array([np.nan, 100.0]), e, 1, 1).passed
    assert not compare("x", np.zeros(3), e, 1, 1).passed


def test_backend_selection_and_ort_threads(tmp_path) -> None:
    from engines.backends import tensorrt

    ok, why = tensorrt.available()
    assert select_backend("auto") == ("tensorrt" if ok else "ort")
    assert select_backend("ort") == "ort"
    if not ok:
        with pytest.raises(EngineBuildError) as ei:
            select_backend("tensorrt")
        assert ei.value.reason == "backend_unavailable" and why in str(ei.value)
    from testsupport.bundles import tiny_onnx

    eng = OrtEngine(tiny_onnx(tmp_path / "m.onnx"), intra_op_threads=1, inter_op_threads=1, max_batch=4)
    assert eng.max_batch == 4 and eng.input_names == ("image",)
    eng.close()


def test_tensorrt_backend_real(setup, tmp_path) -> None:
    from engines.backends import tensorrt

    ok, why = tensorrt.available()
    if not ok:
        pytest.skip(f"TensorRT backend needs TensorRT 10 + pycuda + a GPU: {why}")
    key, trust, models = setup
    opts = runtime.EngineOptions(backend="tensorrt", max_batch=4)
    runtime.install_bundle(models, make_bundle(tmp_path, key), trust, opts)
    res = runtime.compile_engine(models, "tiny", opts, trust=trust)
    assert res.backend == "tensorrt" and res.golden.passed and res.cache_hit
    out = res.engine.infer({"image": np.ones((3, 1, SIZE, SIZE), np.float32)})
    assert out["scores"].shape == (3, 2)
    res.engine.close()
