"""``appliance demo`` end to end: the real daemon with the reference bundles, phantoms sent over DICOM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from testsupport.common import ROOT, wait_until
from testsupport.daemon import appliance_cli, daemon_env, running_daemon

pytestmark = pytest.mark.integration


def test_demo_shows_findings_and_result_files(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    env = daemon_env()
    env.pop("APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES")  # the demo's own defaults must do it
    env.pop("APPLIANCE_ENGINES__TRUST_DEMO_KEY")
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
    # the hints name a command that works as printed (a full path when the venv's bin is not on PATH)
    # ... with the demo's settings file, so that they see the box as the demo ran it (trusting the demo key)
    config = home / "demo.toml"
    prefix = rf"^  (\S+) --home {re.escape(str(home))} --config {re.escape(str(config))} (.+)$"
    hints = {rest: cmd for cmd, rest in re.findall(prefix, out, flags=re.M)}
    assert {"studies", "study show 1", "status", "selftest --no-pacs"} <= set(hints), out
    checked = subprocess.run(
        [hints["status"], "--home", str(home), "--config", str(config), "selftest", "--no-pacs", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    steps = {c["name"]: c["ok"] for c in json.loads(checked.stdout)["checks"]}
    assert steps["active_bundles"] and steps["phantom_chain"], checked.stdout  # the reference bundles load
    assert not steps["pacs_destination"]  # the demo has no PACS: named, not hidden
    shown = subprocess.run(
        [hints["studies"], "--home", str(home), "studies", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert len(json.loads(shown.stdout)) == 3


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_stopped_by_a_signal_stops_its_daemon(tmp_path: Path) -> None:
    """The daemon runs in its own session; a demo ended by SIGTERM (a closed terminal, a service manager)
    must not leave it running behind."""
    home = tmp_path / "demo-home"
    env = daemon_env()
    env.pop("APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES")
    env.pop("APPLIANCE_ENGINES__TRUST_DEMO_KEY")
    demo = subprocess.Popen(
        [sys.executable, "-m", "appliance", "demo", "--home", str(home)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    status = home / "run" / "status.json"
    pid = 0
    try:
        doc = wait_until(lambda: json.loads(status.read_text()) if status.is_file() else None, 60, "daemon up")
        pid = int(doc["pid"])
        demo.send_signal(signal.SIGTERM)
        # 143 from the demo's own handler; -15 if the signal came as it was exiting (default action)
        assert demo.wait(60) in (128 + signal.SIGTERM, -signal.SIGTERM)
        wait_until(lambda: not _alive(pid), 30, "the demo's daemon stopped")
    finally:
        if demo.poll() is None:
            demo.kill()
        if pid and _alive(pid):  # the test failed: leave no daemon behind
            os.kill(pid, signal.SIGKILL)


def test_demo_on_a_home_with_a_running_appliance_refuses_and_leaves_it_alone(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with running_daemon(home) as d:
        r = subprocess.run(
            [sys.executable, "-m", "appliance", "demo", "--home", str(home)],
            cwd=ROOT,
            env=daemon_env({"COLUMNS": "400"}),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1
        assert f"already running on {home}" in r.stdout and str(d.proc.pid) in r.stdout
        # the running appliance's status is untouched: `appliance status` still finds it
        st = appliance_cli(home, "status", "--json")
        assert json.loads(st.stdout)["running"] is True
