"""Model updates on the running daemon: the twin's director (the fake IoT Hub over TLS) -> the update agent ->
a real TUF repository over HTTP -> the pipeline switching between studies; SIGKILL at every stage."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from appliance.updates.layout import UpdateState
from engines import runtime
from engines.keys import TrustStore, key_id, public_key_b64
from engines.registry import Registry
from testsupport.bundles import make_bundle, new_key
from testsupport.cloud import DEVICE, cloud_env
from testsupport.common import wait_until
from testsupport.daemon import Daemon, running_daemon, start_daemon
from testsupport.dcmtk import storescu
from testsupport.fakehub import FakeHub
from testsupport.pipeline import make_dataset, save, synthetic_image
from testsupport.updaterepo import Fault, RepoServer, TufRepo

pytestmark = pytest.mark.integration

ORDER = [s.value for s in UpdateState]


@pytest.fixture(scope="module")
def key() -> Any:
    return new_key()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, key: Any) -> Iterator[tuple[TufRepo, RepoServer, Path]]:
    """One TUF repository per module with tiny 1.1.0 published (1.0.0 is what the boxes run), served over HTTP;
    and a template state directory with 1.0.0 installed and active."""
    d = tmp_path_factory.mktemp("upd")
    b100 = make_bundle(d, key, version="1.0.0")
    repo = TufRepo(d / "repo")
    repo.publish(make_bundle(d, key, version="1.1.0", gain=2.0), "tiny", "1.1.0")
    template = d / "template"
    trust = TrustStore.from_config({key_id(key): public_key_b64(key)})
    runtime.install_bundle(template / "models", b100, trust, runtime.EngineOptions(backend="ort"))
    with RepoServer(repo.dir) as server:
        yield repo, server, template


def _env(home: Path, hub: FakeHub, pki: Any, device_key: str, central_keys: Any, key: Any, url: str, root: Path):
    env = {
        k: v
        for k, v in cloud_env(home, hub.port, pki, device_key, central_keys["pub"]).items()
        if k.startswith("APPLIANCE_CLOUD__")
    }
    env.update(
        APPLIANCE_PIPELINE__ENABLED="true",
        APPLIANCE_PIPELINE__POLL_S="0.2",
        APPLIANCE_PIPELINE__EARLY_PREPARE="false",
        APPLIANCE_ENGINES__BACKEND="ort",
        APPLIANCE_ENGINES__TRUST_DEMO_KEY="false",
        APPLIANCE_ENGINES__TRUSTED_KEYS=f'{{"{key_id(key)}": "{public_key_b64(key)}"}}',
        APPLIANCE_UPDATES__ENABLED="true",
        APPLIANCE_UPDATES__REPOSITORY_URL=url,
        APPLIANCE_UPDATES__ROOT_FILE=str(root),
        APPLIANCE_UPDATES__COMPILE_HEADROOM_BYTES="0",
        APPLIANCE_UPDATES__POLL_S="0.2",
        APPLIANCE_UPDATES__RETRY_S="0.5",
    )
    return env


def _home(tmp_path: Path, template: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(template, home)
    return home


def _states(hub: FakeHub) -> list[str]:
    out: list[str] = []
    for p in hub.reported_patches(DEVICE):
        doc = (p.get("model_updates") or {}).get("tiny")
        if doc and (not out or out[-1] != doc["state"]):
            out.append(doc["state"])
    return out


def _row(d: Daemon) -> dict[str, Any] | None:
    try:
        rows = d.query("SELECT * FROM model_updates WHERE bundle_id='tiny'")
    except Exception:  # the table is not there until the daemon migrated
        return None
    return dict(rows[0]) if rows else None


def _study(tmp_path: Path, n: int) -> list[Path]:
    uid = pydicom.uid.generate_uid()
    ds = make_dataset(synthetic_image(300, 240, (100, 120), radius=15), study_uid=uid)
    return [save(ds, tmp_path / "in" / f"s{n}.dcm")]


def test_director_patch_reaches_active_and_each_study_runs_on_one_version(
    tmp_path: Path, hub: FakeHub, pki: Any, device_key: str, central_keys: Any, key: Any, repo: Any
) -> None:
    tuf, server, template = repo
    home = _home(tmp_path, template)
    env = _env(home, hub, pki, device_key, central_keys, key, server.url, tuf.root_file)
    with running_daemon(home, env=env) as d:
        wait_until(lambda: hub.is_connected(DEVICE), timeout=30, what="device connected")
        assert storescu(d.port, _study(tmp_path, 0)).returncode == 0
        wait_until(lambda: d.studies("inferred"), timeout=60, what="first study on 1.0.0")

        stop = threading.Event()
        sent = [1]

        def stream() -> None:  # studies keep arriving while the box switches
            while not stop.is_set():
                storescu(d.port, _study(tmp_path, sent[0]))
                sent[0] += 1
                stop.wait(0.3)

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        try:
            hub.update_desired(
                DEVICE,
                {"model_updates": {"bundles": {"tiny": {"version": "1.1.0"}}, "policy": {"health_studies": 1}}},
            )
            wait_until(lambda: "active" in _states(hub), timeout=180, what="update reported active")
        finally:
            stop.set()
            t.join(30)
        assert _states(hub)[-8:] == ORDER[1:9], _states(hub)  # waiting_window ... active, in order
        reported = hub.twin(DEVICE)["reported"]
        assert reported["model_updates"]["tiny"]["active_version"] == "1.1.0"
        assert hub.twin(DEVICE)["desired"]["model_updates"]["bundles"]["tiny"]["version"] == "1.1.0"
        wait_until(
            lambda: len(d.studies()) == sent[0] and all(s["state"] in ("inferred", "failed") for s in d.studies()),
            timeout=120,
            what="every study analysed",
        )
        studies = d.studies()
        assert [s["state"] for s in studies] == ["inferred"] * len(studies)  # none broke during the switch
        versions = {
            s["id"]: [
                r["bundle_version"] for r in d.query("SELECT bundle_version FROM results WHERE study_id=?", (s["id"],))
            ]
            for s in studies
        }
        assert all(len(v) == 1 for v in versions.values()), versions  # each study whole on one version
        ordered = [versions[s["id"]][0] for s in studies]
        assert ordered[0] == "1.0.0" and ordered[-1] == "1.1.0", ordered
        assert ordered == sorted(ordered), ordered  # never back to the old one once switched


def test_health_gate_failure_rolls_back_on_the_daemon(
    tmp_path: Path, hub: FakeHub, pki: Any, device_key: str, central_keys: Any, key: Any, repo: Any
) -> None:
    tuf, server, template = repo
    home = _home(tmp_path, template)
    env = _env(home, hub, pki, device_key, central_keys, key, server.url, tuf.root_file)
    with running_daemon(home, env=env) as d:
        wait_until(lambda: hub.is_connected(DEVICE), timeout=30, what="device connected")
        hub.update_desired(
            DEVICE,
            {
                "model_updates": {
                    "bundles": {"tiny": {"version": "1.1.0"}},
                    "policy": {"health_studies": 1, "health_deadline_s": 3},
                }
            },
        )
        wait_until(lambda: "rolled_back" in _states(hub), timeout=180, what="rolled back")  # no study came
        doc = hub.twin(DEVICE)["reported"]["model_updates"]["tiny"]
        assert doc["active_version"] == "1.0.0" and "0 of 1 studies" in doc["reason"], doc
        assert storescu(d.port, _study(tmp_path, 0)).returncode == 0
        wait_until(lambda: d.studies("inferred"), timeout=60, what="study on the old version")
        assert d.query("SELECT bundle_version FROM results")[0]["bundle_version"] == "1.0.0"


def _reached(d: Daemon, stage: str, partial: bool = False) -> Any:
    """A poll for the persisted update row once it is at ``stage`` or beyond (with ``partial``: downloading
    with some bytes on disk, not all). Returns the row, else None."""

    def poll() -> dict[str, Any] | None:
        r = _row(d)
        if r is None or r["target"] != "1.1.0":
            return None
        if partial:
            return r if r["state"] == "downloading" and 0 < r["bytes"] < (r["total"] or 0) else None
        return r if ORDER.index(r["state"]) >= ORDER.index(stage) else None

    return poll


STAGES = ["downloading", "verifying", "compiling", "validating", "activating", "health_gate"]


def test_sigkill_at_every_stage_leaves_one_version_and_the_update_ends(
    tmp_path: Path, hub: FakeHub, pki: Any, device_key: str, central_keys: Any, key: Any, repo: Any
) -> None:
    tuf, server, template = repo
    landed = {}
    hub.update_desired(  # every fresh box below gets this director with its first full twin GET
        DEVICE,
        {"model_updates": {"bundles": {"tiny": {"version": "1.1.0"}}, "policy": {"health_studies": 0}}},
    )
    served = next(tuf.targets_dir.rglob("*.tiny-1.1.0.bundle"))
    for stage in STAGES:
        home = _home(tmp_path / stage, template)
        env = _env(home, hub, pki, device_key, central_keys, key, server.url, tuf.root_file)
        if stage == "downloading":  # a slow link: the kill lands with part of the file on disk
            server.faults[served.name] = Fault(trickle_s=0.05, times=1)
        before = len(server.target_requests())
        d = start_daemon(home, env=env)
        try:
            reached = wait_until(_reached(d, stage, partial=stage == "downloading"), timeout=120, what=stage)
            d.kill()
            landed[stage] = reached["state"]
            # what the killed box left on disk (it may have written more since `reached` was read)
            parts = list((home / "updates" / "partial").glob("*.part"))
            at_kill = parts[0].stat().st_size if len(parts) == 1 else None
        finally:
            d.kill()
            server.faults.pop(served.name, None)
        with running_daemon(home, env=env) as d2:
            end = wait_until(
                lambda: (r := _row(d2)) is not None and r["state"] in ("active", "failed") and r,
                timeout=180,
                what=f"update ends after a kill at {stage}",
            )
            reg = Registry(home / "models", TrustStore.from_config({key_id(key): public_key_b64(key)}))
            state = reg.state("tiny")
            assert state["active"] in ("1.0.0", "1.1.0")  # exactly one version active
            assert end["state"] == "active" and state["active"] == "1.1.0", (stage, end)
            assert not any((home / "updates" / "partial").glob("*.part"))
        if stage == "downloading":  # the restarted box continued the file where the killed one stopped
            ranges = [rng for _, rng in server.target_requests()[before:]]
            assert at_kill is not None and 0 < reached["bytes"] <= at_kill < reached["total"], (reached, at_kill)
            assert ranges[0] is None and ranges[-1] == f"bytes={at_kill}-", ranges
    assert set(landed) == set(STAGES)
    print("kill landed in:", landed)
