"""Retention: settled studies are purged after retention.days, files and PHI gone, re-sends stored again."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from appliance.core.store import Store
from appliance.lifecycle.studies import PURGED
from engines.reference import phantoms
from testsupport.common import PYTHON, ROOT, wait_until
from testsupport.daemon import daemon_env, running_daemon
from testsupport.dcmtk import storescu

pytestmark = pytest.mark.integration

PIPELINE_ON = {"APPLIANCE_PIPELINE__ENABLED": "true", "APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES": "true"}


def _purge(home: Path, days: str, *args: str) -> dict:
    env = daemon_env({"APPLIANCE_RETENTION__DAYS": days})
    r = subprocess.run(
        [PYTHON, "-m", "appliance", "--home", str(home), "purge", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_settled_study_purged_after_retention_and_resend_is_stored_again(home: Path, tmp_path: Path) -> None:
    study = phantoms.chest_study(tmp_path / "in", seed=3)
    files = [Path(f) for f in study["files"]]
    with running_daemon(home, env=PIPELINE_ON) as d:
        storescu(d.port, files)
        # no PACS destination configured: `inferred` with nothing left to export is settled
        wait_until(lambda: d.studies("inferred"), timeout=60, what="study inferred")
    store = Store(home / "state.db")
    sid = store.query("SELECT id FROM studies")[0]["id"]
    spooled = [home / "spool" / r["path"] for r in store.query("SELECT path FROM instances")]
    result_dir = home / store.query("SELECT dir FROM results")[0]["dir"]  # relative to the state directory
    assert spooled and all(p.is_file() for p in spooled) and any(result_dir.iterdir())
    assert json.loads(store.query("SELECT summary FROM results")[0]["summary"])["patient"]  # PHI while kept

    # within retention: nothing is due, nothing is touched
    assert _purge(home, "7", "--dry-run")["due"] == []
    assert _purge(home, "7")["purged"] == []
    assert all(p.is_file() for p in spooled)

    time.sleep(1.0)
    assert _purge(home, "0.00001", "--dry-run")["due"] == [sid]  # 0.864 s
    assert _purge(home, "0.00001")["purged"] == [sid]
    assert not any(p.exists() for p in spooled) and not result_dir.exists()
    row = store.query("SELECT state FROM studies WHERE id=?", (sid,))[0]
    assert row["state"] == PURGED
    assert store.query("SELECT COUNT(*) FROM instances")[0][0] == 0
    summary = json.loads(store.query("SELECT summary FROM results")[0]["summary"])
    assert "patient" not in summary and summary["findings"]  # findings kept, patient block gone
    ev = store.query("SELECT detail FROM study_events WHERE to_state=?", (PURGED,))[0]["detail"]
    assert f"{len(spooled)} received file(s)" in ev
    assert _purge(home, "0.00001")["purged"] == []  # idempotent

    # the modality sends the same study again: stored and analysed again, not taken for a duplicate
    with running_daemon(home, env=PIPELINE_ON) as d:
        storescu(d.port, files)
        wait_until(lambda: d.studies("inferred"), timeout=60, what="re-sent study inferred")
        assert len(d.instances()) == len(files)
        assert "study purged" not in d.logs()
