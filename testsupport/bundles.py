"""Engine test data: a tiny real ONNX model, a manifest for it, keys, and signed bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from engines import bundle as B
from engines.golden import reference_outputs, save_golden
from engines.keys import TrustStore, generate_private_key, key_id, load_private_key, public_key_b64

SIZE = 16
ROOT = Path(__file__).resolve().parents[1]
# The DEMO key's private half (public on purpose, never shipped): for tests that play the attacker who copied it.
DEMO_PRIVATE_KEY = ROOT / "training" / "keys" / "DEMO-ONLY-NOT-FOR-PRODUCTION.ed25519.pem"


def tiny_onnx(path: Path, gain: float = 1.0) -> Path:
    """x (N,1,16,16) -> heatmap (N,2,4,4) = avgpool4(x)*[gain,-gain]; scores (N,2) = sigmoid(mean(heatmap))."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])
    heat = helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", 2, SIZE // 4, SIZE // 4])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 1, 1], [gain, -gain])
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Conv", ["pooled", "w"], ["heatmap"]),
        helper.make_node("ReduceMean", ["heatmap"], ["mean"], axes=[2, 3], keepdims=0),
        helper.make_node("Sigmoid", ["mean"], ["scores"]),
    ]
    graph = helper.make_graph(nodes, "tiny", [x], [heat, scores], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def manifest_doc(bundle_id: str = "tiny", version: str = "1.0.0", **over: Any) -> dict[str, Any]:
    """The manifest (as a dict) of a bundle of :func:`tiny_onnx`: a CXR task on DX/CR chests; ``over``
    replaces top-level keys."""
    doc: dict[str, Any] = {
        "bundle_id": bundle_id,
        "version": version,
        "task": "cxr",
        "title": "Tiny test model - NOT FOR CLINICAL USE",
        "clinical_use": False,
        "applies_to": {"modalities": ["DX", "CR"], "body_parts": ["CHEST"]},
        "inputs": [
            {
                "name": "image",
                "shape": ["N", 1, SIZE, SIZE],
                "preprocessing": {"target_size": [SIZE, SIZE]},
            }
        ],
        "outputs": [
            {"name": "scores", "kind": "scores", "labels": ["a", "b"], "thresholds": {"a": 0.5}},
            {"name": "heatmap", "kind": "heatmap", "labels": ["a", "b"], "activation": "none", "stride": 4},
        ],
        "golden_tolerances": {
            "scores": {"fp32": {"atol": 1e-5, "rtol": 1e-4}, "fp16": {"atol": 1e-2, "rtol": 1e-2}},
            "heatmap": {"fp32": {"atol": 1e-5, "rtol": 1e-4}, "fp16": {"atol": 1e-2, "rtol": 1e-2}},
        },
    }
    doc.update(over)
    return doc


def make_bundle(
    tmp: Path,
    key: Any,
    *,
    bundle_id: str = "tiny",
    version: str = "1.0.0",
    gain: float = 1.0,
    golden_gain: float | None = None,
    name: str | None = None,
    **over: Any,
) -> Path:
    """Build and sign a bundle of the tiny model. ``golden_gain`` != gain makes a bundle whose golden
    outputs the model does not reproduce."""
    work = tmp / f"src-{bundle_id}-{version}-{gain}-{golden_gain}"
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_onnx(work / "model.onnx", gain)
    inputs = {"image": np.random.default_rng(0).random((2, 1, SIZE, SIZE), dtype=np.float32)}
    ref_model = tiny_onnx(work / "ref.onnx", golden_gain) if golden_gain is not None else model
    save_golden(work / "golden.npz", inputs, reference_outputs(ref_model, inputs))
    out = tmp / (name or f"{bundle_id}-{version}.bundle")
    B.build_bundle(
        out, manifest_doc(bundle_id, version, **over), {"model.onnx": model, "golden.npz": work / "golden.npz"}
    )
    if key is not None:
        B.sign_bundle(out, key)
    return out


def trust_for(*keys: Any, revoked: tuple = ()) -> TrustStore:
    """A trust store holding the public halves of ``keys``, with ``revoked`` key ids."""
    return TrustStore.from_config({key_id(k): public_key_b64(k) for k in keys}, revoked)


def new_key() -> Any:
    """A fresh bundle-signing private key (Ed25519, as ``engines.keys`` makes them)."""
    return generate_private_key()


def demo_private_key() -> Any:
    """The DEMO key's private half (the one committed to the public repository)."""
    return load_private_key(DEMO_PRIVATE_KEY)
