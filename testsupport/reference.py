"""The REAL reference bundles (cxr-phantom, mmg-phantom) on ONNX Runtime, for tests that assert model inputs
and scores of whole files: one installed set per test module, the offline pipeline (``run_offline``) on files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from appliance.app.infer_offline import run_offline
from appliance.core.config import Settings
from appliance.models.active import ActiveEngines
from appliance.pipeline.preprocess import prepare
from appliance.pipeline.router import image_matches

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "cases"  # copies of ../shared/cases (the field cases; ruff-formatted)


def trust_reference_bundles(settings: Settings) -> Settings:
    """Opt ``settings`` in to the DEMO key and the shipped reference bundles (both off by default: a clinic box
    never trusts a key whose private half is public). Tests and ``appliance demo`` only. Returns ``settings``."""
    settings.engines.trust_demo_key = True
    settings.engines.install_reference_bundles = True
    return settings


def reference_engines(home: Path) -> tuple[Settings, ActiveEngines]:
    """Settings on ``home`` with the reference bundles installed and active (ONNX Runtime; demo key trusted)."""
    settings = trust_reference_bundles(Settings(state_dir=home))
    settings.engines.backend = "ort"
    engines = ActiveEngines(settings, install_reference=True)
    engines.active()
    return settings, engines


def write_case(name: str, out: Path, *args: str) -> Path:
    """Run a field-case script (``tests/cases/<name>.py``) to write its input to ``out``."""
    subprocess.run(
        [sys.executable, str(CASES / f"{name}.py"), str(out), *args],
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
    )
    return out


def model_input(engines: ActiveEngines, settings: Settings, path: Path) -> tuple[str, np.ndarray]:
    """(bundle id, model input tensor) of the one active bundle that takes the file."""
    ds = pydicom.dcmread(path)
    taken = [m for m, _ in engines.active() if image_matches(m, ds)]
    assert len(taken) == 1, [m.bundle_id for m in taken]
    p = settings.pipeline
    return taken[0].bundle_id, prepare(ds, taken[0].input.preprocessing, p.max_pixels, p.min_image_size).tensor


def findings(engines: ActiveEngines, settings: Settings, path: Path) -> dict[str, Any]:
    """label -> (score, positive) of the single image in ``path``, through the offline pipeline."""
    report = run_offline(settings, [path], None, bundles=engines)
    assert not report["errors"], report["errors"]
    (study,) = report["studies"]
    (result,) = study["results"]
    return {f["label"]: (f["score"], f["positive"]) for f in result["findings"]}
