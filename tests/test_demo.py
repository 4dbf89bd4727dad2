"""``appliance demo`` end to end: the real daemon with the reference bundles, phantoms sent over DICOM."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from testsupport.common import ROOT
from testsupport.daemon import daemon_env

pytestmark = pytest.mark.integration


def test_demo_shows_findings_and_result_files(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    env = daemon_env()
    env.pop("APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES")  # the demo's own defaults must do it
    r = subprocess.run(
        [sys.executable, "-m", "appliance", "demo", "--home", str(home)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    nodule = out[out.index("chest, one nodule: inferred") : out.index("chest, normal: inferred")]
    assert re.search(r"nodule\s*│\s*0\.\d+\s*│\s*0\.\d+\s*│\s*POSITIVE", nodule), nodule
    assert "mammogram, mass in the left breast: inferred" in out and "L breast" in out
    paths = [Path(p) for p in re.findall(r"^  (?:SR|SC): (\S+\.dcm)$", out, flags=re.M)]
    assert len(paths) == 2 + 2 + 5  # SR + SC per chest, SR + 4 SC for the mammogram
    for p in paths:
        assert p.is_file() and str(p).startswith(str(home))
    assert pydicom.dcmread(paths[0]).Modality == "SR"
    # not --keep: the daemon is gone
    assert not (home / "run" / "status.json").exists()
