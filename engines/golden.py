"""Golden-output check: does a compiled engine still compute what the signed model computed?

``golden.npz`` in each bundle holds ``input:<name>`` and ``output:<name>`` arrays produced by the reference
runtime (ONNX Runtime, fp32) when the bundle was built. After every compile the engine runs the golden
inputs and each output is compared the way Polygraphy does it: an element fails only if it exceeds BOTH
the absolute and the relative tolerance; the report keeps max abs/rel diff per output. Tolerances come
from the manifest per output and per precision ("fp32", "fp16").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engines.backends.base import Engine
from engines.manifest import MAX_GOLDEN_ATOL, MAX_GOLDEN_RTOL, Manifest


@dataclass
class OutputCheck:
    name: str
    passed: bool
    atol: float
    rtol: float
    max_abs_diff: float
    max_rel_diff: float
    mismatched: int
    total: int
    note: str = ""


@dataclass
class GoldenReport:
    passed: bool
    precision: str
    outputs: list[OutputCheck]

    def as_dict(self) -> dict:
        return {"passed": self.passed, "precision": self.precision, "outputs": [asdict(o) for o in self.outputs]}

    def summary(self) -> str:
        bad = [o for o in self.outputs if not o.passed]
        if not bad:
            return "golden outputs match"
        return "; ".join(
            f"{o.name}: {o.note or f'{o.mismatched}/{o.total} elements off'} (max abs {o.max_abs_diff:.3g}, "
            f"atol {o.atol:g}, rtol {o.rtol:g})"
            for o in bad
        )


def load_golden(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as npz:
        inputs = {k.split(":", 1)[1]: npz[k] for k in npz.files if k.startswith("input:")}
        outputs = {k.split(":", 1)[1]: npz[k] for k in npz.files if k.startswith("output:")}
    return inputs, outputs


def save_golden(path: Path, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    arrays = {f"input:{k}": v for k, v in inputs.items()} | {f"output:{k}": v for k, v in outputs.items()}
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub: ** could name allow_pickle


def _failed(name: str, atol: float, rtol: float, mismatched: int, total: int, note: str) -> OutputCheck:
    """A check that cannot even be measured element-wise (shape, NaN/inf): failed, infinitely far off."""
    return OutputCheck(name, False, atol, rtol, float("inf"), float("inf"), mismatched, total, note=note)


def compare(name: str, actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> OutputCheck:
    """Polygraphy-style element-wise comparison (fail only where |diff| > atol AND |diff|/|exp| > rtol).

    Fails outright (never passes by NaN comparisons) on non-finite or out-of-bounds tolerances
    (``0 <= atol <= MAX_GOLDEN_ATOL``, ``0 <= rtol <= MAX_GOLDEN_RTOL``) and on non-finite golden values."""
    if not (
        math.isfinite(atol) and math.isfinite(rtol) and 0 <= atol <= MAX_GOLDEN_ATOL and 0 <= rtol <= MAX_GOLDEN_RTOL
    ):
        return _failed(name, atol, rtol, expected.size, expected.size, "tolerance not finite or above the maximum")
    if actual.shape != expected.shape:
        note = f"shape {actual.shape} != golden {expected.shape}"
        return _failed(name, atol, rtol, expected.size, expected.size, note)
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    if not np.all(np.isfinite(e)):
        return _failed(name, atol, rtol, int((~np.isfinite(e)).sum()), e.size, "non-finite golden values")
    if not np.all(np.isfinite(a)):
        return _failed(name, atol, rtol, int((~np.isfinite(a)).sum()), a.size, "non-finite values")
    diff = np.abs(a - e)
    rel = diff / np.maximum(np.abs(e), 1e-12)
    bad = (diff > atol) & (rel > rtol)
    return OutputCheck(
        name,
        not bool(bad.any()),
        atol,
        rtol,
        float(diff.max(initial=0.0)),
        float(rel.max(initial=0.0)),
        int(bad.sum()),
        int(a.size),
    )


def check_engine(engine: Engine, golden_path: Path, manifest: Manifest, precision: str) -> GoldenReport:
    """Run the golden inputs through ``engine`` and compare every declared output."""
    inputs, expected = load_golden(golden_path)
    checks: list[OutputCheck] = []
    try:
        got = engine.infer(inputs)
    except Exception as exc:  # an engine that cannot even run its golden inputs fails the check
        note = f"inference failed: {exc.__class__.__name__}: {str(exc)[:300]}"
        checks = [OutputCheck(o.name, False, 0, 0, float("inf"), float("inf"), 0, 0, note) for o in manifest.outputs]
        return GoldenReport(False, precision, checks)
    for out in manifest.outputs:
        tolerances = manifest.golden_tolerances[out.name]
        tol = tolerances.get(precision) or tolerances.get("fp32")
        if out.name not in expected:
            checks.append(OutputCheck(out.name, False, 0, 0, 0, 0, 0, 0, note="no golden output in golden.npz"))
        elif out.name not in got:
            checks.append(OutputCheck(out.name, False, 0, 0, 0, 0, 0, 0, note="engine has no such output"))
        elif tol is None:
            checks.append(OutputCheck(out.name, False, 0, 0, 0, 0, 0, 0, note=f"no tolerance for {precision}"))
        else:
            checks.append(compare(out.name, np.asarray(got[out.name]), expected[out.name], tol.atol, tol.rtol))
    return GoldenReport(all(c.passed for c in checks), precision, checks)


def reference_outputs(onnx_path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Golden outputs from the reference runtime: ONNX Runtime, CPU, basic graph optimisations only."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, inputs), strict=True))
