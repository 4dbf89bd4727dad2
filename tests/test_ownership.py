"""Ownership: commands run as root leave files the service user can read; an unreadable device key is a clear
error in ``appliance status``, ``appliance cloud status`` and the logs, never a silent failure to connect."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.cli.daemon_cmds import status_doc
from appliance.cloud.agent import CloudAgent
from appliance.cloud.client import credential_problems
from appliance.core.config import load_settings
from appliance.core.logs import configure
from appliance.core.store import Store
from appliance.models.active import trust_store
from engines.keys import key_id, public_key_b64
from engines.registry import Registry
from testsupport.bundles import make_bundle, new_key
from testsupport.cloud import HUB
from testsupport.common import ROOT
from testsupport.daemon import daemon_env
from testsupport.fakehub import FakeHub

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: it checks what root leaves behind"),
]
SERVICE = 65534  # nobody: the service user of this test
GROUP_KEY = "Z3JvdXAta2V5LWZvci10ZXN0cy0zMi1ieXRlcy1sb25nISE="


def _cli(home: Path, cfg: Path, *args: str) -> subprocess.CompletedProcess:
    """The command line, run as root (the technician)."""
    cmd = [sys.executable, "-m", "appliance", "--config", str(cfg), "--home", str(home), *args]
    return subprocess.run(
        cmd, cwd=ROOT, env={**daemon_env(), "COLUMNS": "200"}, capture_output=True, text=True, timeout=120
    )


def _as_service(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a forked child running as the service user (uid and gid 65534, no supplementary groups); its
    JSON-able result, or the text of what it raised. A fork, because the interpreter itself lives where that
    user cannot read: everything ``fn`` needs is imported here first."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the service user, run, report, and leave without cleanup
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(SERVICE)
            os.setuid(SERVICE)
            out = {"ok": fn()}
        except BaseException as exc:  # reported to the parent as the result
            out = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(w, json.dumps(out, default=str).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    out = json.loads(b"".join(chunks))
    if "error" in out:
        raise AssertionError(f"as the service user: {out['error']}")
    return out["ok"]


def _everything(home: Path) -> list[Path]:
    return [home, *home.rglob("*")]


@pytest.fixture
def service_home() -> Iterator[Path]:
    """A state directory owned by the service user, in a folder that user can reach (pytest's own temporary
    folders are root's, 0700), beside a folder ``shared`` the service user may write."""
    top = Path(tempfile.mkdtemp(prefix="ownership-"))
    os.chmod(top, 0o755)
    home, shared = top / "home", top / "shared"
    for d in (home, shared):
        d.mkdir(mode=0o750)
        os.chown(d, SERVICE, SERVICE)
    yield home
    shutil.rmtree(top)


def test_root_commands_leave_every_file_to_the_service_user(
    service_home: Path, tmp_path: Path, hub: FakeHub, pki
) -> None:
    home = service_home
    hub.add_enrollment_group("clinics", GROUP_KEY)
    cfg = tmp_path / "appliance.toml"
    signer = new_key()
    trusted = f'{{ "{key_id(signer)}" = "{public_key_b64(signer)}" }}'
    cfg.write_text(f"[engines]\ninstall_reference_bundles = false\ntrusted_keys = {trusted}\n")
    r = _cli(home, cfg, "provision", "dps", "--id-scope", hub.id_scope, "--connect-host", "127.0.0.1", "--port",
             str(hub.port), "--ca-file", str(pki["ca"]), "--timeout", "20", "--registration-id", "clinic-0200",
             "--group-key", GROUP_KEY)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    bundle = make_bundle(tmp_path / "b", signer)
    r = _cli(home, cfg, "model", "install", str(bundle))
    assert r.returncode == 0, r.stdout + r.stderr
    r = _cli(home, cfg, "purge")
    assert r.returncode == 0, r.stdout + r.stderr

    made = _everything(home)
    assert len(made) > 10 and (home / "secrets" / "device_key").is_file() and (home / "state.db").is_file()
    wrong = [(str(p), p.lstat().st_uid) for p in made if p.lstat().st_uid != SERVICE or p.lstat().st_gid != SERVICE]
    assert wrong == [], wrong
    assert stat.S_IMODE((home / "secrets" / "device_key").stat().st_mode) == 0o600  # still a secret

    # the service user reads everything it needs: its identity, the database, the installed model
    settings = load_settings(cfg, {"state_dir": home})

    trust = trust_store(settings)  # read here: the forked child cannot import codecs from under /root

    def service_view() -> dict:
        store = Store(settings.db_path)  # opens (and would migrate) the database root created
        return {
            "problems": credential_problems(settings),
            "studies": store.state_counts(),
            "active": Registry(settings.models_dir, trust).active_version("tiny"),
        }

    seen = _as_service(service_view)
    assert seen["problems"] == [] and seen["studies"] == {} and seen["active"] == "1.0.0", seen


def test_unreadable_device_key_is_a_clear_error_in_status_and_logs(
    service_home: Path, tmp_path: Path, hub: FakeHub, pki, device_key: str
) -> None:
    home = service_home
    key_file = home / "secrets" / "device_key"
    key_file.parent.mkdir(mode=0o700)
    key_file.write_text(device_key)
    ca = home.parent / "shared" / "ca.pem"  # where the service user can read it
    shutil.copy(pki["ca"], ca)
    os.chmod(ca, 0o644)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(
        f'[cloud]\nenabled = true\nhub_hostname = "{HUB}"\nconnect_host = "127.0.0.1"\nport = {hub.port}\n'
        f'device_id = "clinic-device-01"\nca_file = "{ca}"\nrecipient_keys = {{}}\n'
        "backoff_min_s = 0.2\nbackoff_max_s = 0.5\nbackoff_jitter_s = 0.1\n"
    )
    os.chmod(cfg, 0o644)
    for p in _everything(home):
        os.lchown(p, SERVICE, SERVICE)
    os.chmod(key_file, 0)  # what a careless `chmod` or a root-only restore leaves

    settings = load_settings(cfg, {"state_dir": home})
    as_root = status_doc(settings)["cloud"]["problems"]  # the technician's view: the service user cannot read it
    as_service = _as_service(lambda: status_doc(settings)["cloud"]["problems"])
    for problems in (as_root, as_service):
        (problem,) = problems
        assert str(key_file) in problem and "read" in problem, problem
    assert "uid 65534" in as_root[0] and "Permission denied" in as_service[0]
    cs = _cli(home, cfg, "cloud", "status")
    assert cs.returncode == 0 and "device_key" in cs.stderr and json.loads(cs.stdout)["credential_problems"], cs
    shown = _cli(home, cfg, "status")
    assert shown.returncode == 0 and "cloud:" in shown.stdout and "device_key" in shown.stdout, shown.stdout

    # the agent, run as the service user, says so in its log (and status) instead of retrying in silence
    log_file = home.parent / "shared" / "agent.log"

    def run_agent() -> dict:
        with open(log_file, "w") as out:
            configure("INFO", "text", out)
            agent = CloudAgent(settings)
            agent.start()
            time.sleep(3.0)
            status = agent.status()
            agent.stop()
        return {"last_error": status["last_error"], "connected": status["connected"]}

    status = _as_service(run_agent)
    text = log_file.read_text()
    assert "cannot read its identity" in text and "Permission denied" in text, text
    assert status["connected"] is False and "device key" in status["last_error"]
    assert not hub.is_connected("clinic-device-01")
