"""systemd/appliance.service: hardened to an exposure of 2.0 or less (``systemd-analyze security --offline``)
and clean under ``systemd-analyze verify``; skipped, saying why, where systemd-analyze is not installed
(``apt-get install systemd`` brings it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from testsupport.common import ROOT

pytestmark = pytest.mark.integration

UNIT = ROOT / "systemd" / "appliance.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)")
MAX_EXPOSURE = 2.0


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_unit_is_notify_with_watchdog_and_no_capabilities() -> None:
    d = _directives(UNIT.read_text(encoding="utf-8"))
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"] and int(d["WatchdogSec"][0]) > 0
    assert d["CapabilityBoundingSet"] == [""] and d["AmbientCapabilities"] == [""]
    assert d["ProtectSystem"] == ["strict"] and d["ReadWritePaths"] == ["/var/lib/appliance"]
    assert d["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in d["DeviceAllow"]}
    assert {"char-nvidia*", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvmap", "/dev/nvhost-ctrl-gpu"} <= allowed


def _exposure(unit: Path) -> float:
    assert ANALYZE is not None
    r = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(unit)], capture_output=True, text=True, timeout=120
    )
    m = re.search(r"Overall exposure level for appliance\.service:\s*([0-9.]+)", r.stdout)
    assert m, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    return float(m.group(1))


@needs_analyze
def test_security_exposure_at_most_2() -> None:
    assert _exposure(UNIT) <= MAX_EXPOSURE


@needs_analyze
def test_port_104_variant_stays_at_most_2(tmp_path: Path) -> None:
    """The drop-in docs/INSTALL.md gives for port 104 (CAP_NET_BIND_SERVICE only) keeps the score."""
    text = UNIT.read_text(encoding="utf-8")
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        assert f"\n{key}=\n" in text
        text = text.replace(f"\n{key}=\n", f"\n{key}=CAP_NET_BIND_SERVICE\n")
    unit = tmp_path / "appliance.service"
    unit.write_text(text, encoding="utf-8")
    assert _exposure(unit) <= MAX_EXPOSURE


@needs_analyze
def test_verify_clean(tmp_path: Path) -> None:
    """``systemd-analyze verify`` in a root holding the unit, an executable /usr/bin/appliance (what
    docs/INSTALL.md links) and the host's system units (sysinit.target and friends): no warning at all."""
    assert ANALYZE is not None
    host_units = Path("/usr/lib/systemd/system")
    if not (host_units / "sysinit.target").exists():
        pytest.skip("no systemd unit directory on this host to verify against")
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/appliance").write_text("#!/bin/sh\n", encoding="utf-8")
    (root / "usr/bin/appliance").chmod(0o755)
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    unit = root / "etc/systemd/system/appliance.service"
    shutil.copy(UNIT, unit)
    r = subprocess.run(
        [ANALYZE, "verify", "--man=no", f"--root={root}", str(unit)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stderr.strip() == "" and r.stdout.strip() == "", (r.returncode, r.stdout, r.stderr)
