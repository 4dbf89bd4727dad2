"""Crash safety and the CLI: the cloud agent in its own process, SIGKILLed mid-stream; central tools."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cloud import outbox, payload
from appliance.cloud.deid import load_or_create_device_secret
from appliance.core.store import Store
from testsupport.cloud import DEVICE, PHI_STRINGS, cloud_env, cloud_settings, sample_result
from testsupport.common import ROOT, wait_until
from testsupport.fakehub import FakeHub

pytestmark = pytest.mark.integration


def test_agent_sigkilled_mid_stream_loses_nothing(home: Path, hub: FakeHub, pki, device_key, central_keys) -> None:
    settings = cloud_settings(home, hub.port, pki, device_key, central_keys["pub"])
    store = Store(settings.db_path)
    secret = load_or_create_device_secret(settings.secrets_dir)
    ids = []
    with store.transaction() as conn:
        for i in range(1000):
            mid, body = payload.build_result_message(
                sample_result(i + 1), settings, secret, recipient_keys=settings.cloud.recipient_keys
            )
            outbox.enqueue(conn, kind="result", message_id=mid, body=body)
            ids.append(mid)
    store.close()
    env = cloud_env(home, hub.port, pki, device_key, central_keys["pub"])
    hub.puback_delay_s = 0.002  # slow the hub a little so the kill lands mid-stream
    cmd = [sys.executable, "-m", "appliance", "cloud", "run"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: len(hub.messages(DEVICE, "result")) >= 200, timeout=30, what="first 200")
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        before = {m.props["$.mid"] for m in hub.messages(DEVICE, "result")}
        assert len(before) < 1000, "the kill must land mid-stream"
        hub.puback_delay_s = 0.0
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(
            lambda: len({m.props["$.mid"] for m in hub.messages(DEVICE, "result")}) == 1000, timeout=60, what="all"
        )
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(15)
    got = [m.props["$.mid"] for m in hub.messages(DEVICE, "result")]
    seen, first = set(), []
    for g in got:
        if g not in seen:
            seen.add(g)
            first.append(g)
    assert first == ids  # in order; any duplicate carries an id that was already delivered
    # Re-sent after the restart: only messages the hub had before the kill whose PUBACK the dead process
    # had not yet committed (in flight, or acknowledged inside the sender's commit batch), never new ones.
    dupes = {g for g in got if got.count(g) > 1}
    assert dupes <= before, sorted(dupes - before)[:5]
    assert Store(settings.db_path).query("SELECT COUNT(*) FROM outbox WHERE kind='result'")[0][0] == 0


def _cli(*args: str, home: Path, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "--home", str(home), *args],
        cwd=ROOT,
        capture_output=True,
        input=input,
        timeout=60,
    )


def test_central_keygen_decrypt_and_cloud_cli(tmp_path: Path, home: Path) -> None:
    r = _cli("central", "keygen", "--out", str(tmp_path / "keys"), "--kid", "central-2025", home=home)
    assert r.returncode == 0, r.stderr
    pub = json.loads(r.stdout)["public_key"]
    assert (tmp_path / "keys" / "central-2025.key").stat().st_mode & 0o777 == 0o600
    again = _cli("central", "keygen", "--out", str(tmp_path / "keys"), "--kid", "central-2025", home=home)
    assert again.returncode == 1 and "refusing" in again.stderr.decode()
    from appliance.core.config import Settings

    s = Settings(state_dir=home, cloud={"device_id": "dev-9", "recipient_keys": {"central-2025": pub}})
    secret = load_or_create_device_secret(s.secrets_dir)
    bodies = [
        payload.build_result_message(sample_result(i), s, secret, recipient_keys=s.cloud.recipient_keys)[1]
        for i in range(3)
    ]
    unvouched = _cli("central", "decrypt", "--key", str(tmp_path / "keys"), home=home, input=b"\n".join(bodies))
    assert unvouched.returncode == 1 and unvouched.stderr.decode().count("no_identity") == 3  # no hub identity
    r = _cli(
        "central", "decrypt", "--key", str(tmp_path / "keys"), "--device", "dev-9", home=home, input=b"\n".join(bodies)
    )
    assert r.returncode == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(docs) == 3 and docs[0]["meta"]["device"] == "dev-9" and docs[0]["payload"]["task"] == "mmg"
    for phi in PHI_STRINGS:
        assert phi not in r.stdout.decode()
    bad = _cli("central", "decrypt", "--key", str(tmp_path / "keys"), home=home, input=b"garbage")
    assert bad.returncode == 1 and "malformed" in bad.stderr.decode()
    store = Store(s.db_path)
    with store.transaction() as c:
        outbox.enqueue(c, kind="health", message_id="h-1", body=b"{}")
    st = _cli("cloud", "status", home=home)
    assert st.returncode == 0 and json.loads(st.stdout)["outbox"]["depth"] == 1
    ob = _cli("cloud", "outbox", home=home)
    assert json.loads(ob.stdout)["pending"][0]["message_id"] == "h-1"
    ps = _cli("cloud", "pseudonym", "1.2.3.4", home=home)
    from appliance.cloud.deid import pseudonym_uid

    assert ps.stdout.decode().strip() == pseudonym_uid(secret, "1.2.3.4")
