"""The update agent against a real TUF repository over real HTTP: the happy path, resume, and every bad input.

Each test builds a TUF repository with the Metadata API (testsupport.updaterepo), serves it on 127.0.0.1 with
Range support and chosen faults, installs a signed tiny bundle 1.0.0 as the active version, then hands the
agent a director document. Whatever goes wrong, 1.0.0 must stay active and loadable.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.core.config import Settings
from appliance.core.store import Store
from appliance.models.active import registry
from appliance.updates.agent import UpdateAgent
from appliance.updates.director import Policy, parse_director
from appliance.updates.gate import StudyGate
from appliance.updates.layout import UpdateState
from engines import runtime
from engines.keys import key_id, public_key_b64
from testsupport.bundles import make_bundle, new_key
from testsupport.common import wait_until
from testsupport.updaterepo import Fault, RepoServer, TufRepo

pytestmark = pytest.mark.integration

TERMINAL = {"active", "failed", "rolled_back"}


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    """The bundle-signing key the box trusts, one it does not know, and one it has revoked."""
    return {"good": new_key(), "unknown": new_key(), "revoked": new_key()}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Any]) -> dict[str, Path]:
    """Signed tiny bundles, built once per module with the project's bundle builder."""
    d = tmp_path_factory.mktemp("bundles")
    good = keys["good"]
    return {
        "1.0.0": make_bundle(d, good, version="1.0.0"),
        "1.1.0": make_bundle(d, good, version="1.1.0", gain=2.0),
        "1.2.0": make_bundle(d, good, version="1.2.0", gain=3.0),
        "golden_bad": make_bundle(d, good, version="1.3.0", gain=1.0, golden_gain=5.0, name="golden-bad.bundle"),
        "other_task": make_bundle(d, good, version="1.4.0", task="mmg", name="other-task.bundle"),
        "unknown_key": make_bundle(d, keys["unknown"], version="1.5.0", name="unknown-key.bundle"),
        "revoked_key": make_bundle(d, keys["revoked"], version="1.6.0", name="revoked-key.bundle"),
        "0.9.0": make_bundle(d, good, version="0.9.0"),
    }


@dataclass
class Box:
    settings: Settings
    store: Store
    agent: UpdateAgent
    repo: TufRepo
    server: RepoServer
    reports: list[dict[str, Any]]

    def desire(self, version: str, bundle_id: str = "tiny", **policy: Any) -> None:
        self.agent.on_desired(_Desired({"bundles": {bundle_id: {"version": version}}, "policy": policy}))

    def states(self, bundle_id: str = "tiny") -> list[str]:
        out: list[str] = []
        for r in self.reports:
            doc = r["model_updates"].get(bundle_id)
            if doc and (not out or out[-1] != doc["state"]):
                out.append(doc["state"])
        return out

    def last(self, bundle_id: str = "tiny") -> dict[str, Any]:
        return [r["model_updates"][bundle_id] for r in self.reports if bundle_id in r["model_updates"]][-1]

    def wait_end(self, version: str, timeout: float = 60) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            row = self.agent.rows.get("tiny")
            if row is not None and row.target == version and str(row.state) in TERMINAL:
                return self.agent._doc(row)
            return None

        return wait_until(done, timeout=timeout, what=f"update to {version} ends")

    def active(self) -> str | None:
        return registry(self.settings).active_version("tiny")

    def serves(self, version: str) -> None:
        """The active version loads, passes its golden check and runs (the model keeps serving)."""
        res = runtime.compile_engine(
            self.settings.models_dir, "tiny", version=version, trust=registry(self.settings).trust
        )
        try:
            assert res.version == version and res.golden.passed
        finally:
            res.engine.close()


class _Desired:
    """What the cloud agent hands the desired hook: an object with the validated ``model_updates``."""

    def __init__(self, doc: dict[str, Any]):
        self.model_updates = doc


@contextmanager
def make_box(
    tmp_path: Path,
    keys: dict[str, Any],
    bundles: dict[str, Path],
    tls: tuple[Path, Path] | None = None,
    ca_file: Path | None = None,
) -> Iterator[Box]:
    """A box running tiny 1.0.0 with a started update agent, and its repository (HTTPS when ``tls``)."""
    repo = TufRepo(tmp_path / "repo")
    good = keys["good"]
    settings = Settings(
        state_dir=tmp_path / "home",
        engines={
            "backend": "ort",
            "trust_demo_key": False,
            "install_reference_bundles": False,
            "trusted_keys": {key_id(k): public_key_b64(k) for k in (good, keys["revoked"])},
            "revoked_keys": [key_id(keys["revoked"])],
        },
        updates={
            "enabled": True,
            "root_file": str(repo.root_file),
            "ca_file": str(ca_file) if ca_file else None,
            "compile_headroom_bytes": 0,
            "poll_s": 0.2,
            "retry_s": 0.5,
            "download_attempts": 3,
            "timeout_s": 5,
        },
    )
    reg = registry(settings)
    runtime.install_bundle(settings.models_dir, bundles["1.0.0"], reg.trust, runtime.EngineOptions(backend="ort"))
    with RepoServer(repo.dir, tls=tls) as server:
        settings.updates.repository_url = server.url
        store = Store(settings.db_path)
        reports: list[dict[str, Any]] = []
        agent = UpdateAgent(settings, store, StudyGate(), report=reports.append)
        agent.start()
        try:
            yield Box(settings, store, agent, repo, server, reports)
        finally:
            agent.stop()
            store.close()


@pytest.fixture
def box(tmp_path: Path, keys: dict[str, Any], bundles: dict[str, Path]) -> Iterator[Box]:
    with make_box(tmp_path, keys, bundles) as b:
        yield b


def _assert_kept(box: Box, doc: dict[str, Any], reason: str) -> None:
    assert doc["state"] == "failed", doc
    assert reason in doc["reason"], doc
    assert box.active() == "1.0.0"
    box.serves("1.0.0")


def test_desired_version_goes_through_every_state_to_active(box: Box, bundles: dict[str, Path]) -> None:
    box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0")
    box.desire("1.1.0", health_studies=0)
    doc = box.wait_end("1.1.0")
    assert doc["state"] == "active" and doc["active_version"] == "1.1.0" and doc["reason"] is None
    assert box.states() == [
        "waiting_window",
        "downloading",
        "verifying",
        "compiling",
        "validating",
        "activating",
        "health_gate",
        "active",
    ]
    size = bundles["1.1.0"].stat().st_size
    downloading = [
        r["model_updates"]["tiny"] for r in box.reports if r["model_updates"]["tiny"]["state"] == "downloading"
    ]
    assert downloading[-1]["bytes"] == size and downloading[-1]["total"] == size
    compiling = [r["model_updates"]["tiny"] for r in box.reports if r["model_updates"]["tiny"]["state"] == "compiling"]
    assert {"phase": "optimise", "done": 1, "total": 1} in [c.get("progress") for c in compiling]  # ORT's build
    assert box.active() == "1.1.0"
    assert box.agent.rows.highest("tiny") == "1.1.0"
    assert list((box.settings.state_dir / "updates" / "partial").iterdir()) == []  # nothing left behind
    box.desire("1.1.0", health_studies=0)  # the same director again (e.g. the full twin GET at reconnect)
    assert box.agent.rows.get("tiny").state == UpdateState.ACTIVE  # type: ignore[union-attr]


def test_interrupted_download_resumes_with_range(box: Box, bundles: dict[str, Path]) -> None:
    served = box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0")
    cut = served.stat().st_size // 3
    box.server.faults[served.name] = Fault(drop_after=cut, times=1)
    box.desire("1.1.0", health_studies=0)
    assert box.wait_end("1.1.0")["state"] == "active"
    gets = box.server.target_requests()
    assert [rng for _, rng in gets] == [None, f"bytes={cut}-"]  # the second request continued where the first broke


def test_golden_failure_never_activates(box: Box, bundles: dict[str, Path]) -> None:
    box.repo.publish(bundles["golden_bad"], "tiny", "1.3.0")
    box.desire("1.3.0", health_studies=0)
    doc = box.wait_end("1.3.0")
    _assert_kept(box, doc, "golden_mismatch")
    assert "activating" not in box.states()
    assert registry(box.settings).state("tiny")["failures"]["1.3.0"]["reason"] == "golden_mismatch"


def test_two_quick_desired_patches_the_last_wins(box: Box, bundles: dict[str, Path]) -> None:
    box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0", commit=False)
    served = box.repo.publish(bundles["1.2.0"], "tiny", "1.2.0")
    box.desire("1.1.0", health_studies=0)
    box.desire("1.2.0", health_studies=0)
    assert box.wait_end("1.2.0")["state"] == "active"
    assert box.active() == "1.2.0"
    assert served.exists()


def test_health_gate_without_enough_studies_rolls_back_by_itself(box: Box, bundles: dict[str, Path]) -> None:
    box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0")
    box.desire("1.1.0", health_studies=2, health_deadline_s=5)
    wait_until(
        lambda: (r := box.agent.rows.get("tiny")) is not None and r.state == UpdateState.HEALTH_GATE,
        timeout=60,
        what="1.1.0 on probation",
    )
    assert box.active() == "1.1.0"
    box.agent.on_outcome("tiny", "1.1.0", None)  # one good study of two
    doc = box.wait_end("1.1.0")
    assert doc["state"] == "rolled_back" and "1 of 2 studies" in doc["reason"]
    assert box.active() == "1.0.0"
    box.serves("1.0.0")
    assert box.states()[-3:] == ["activating", "health_gate", "rolled_back"]


def test_engine_error_on_a_real_study_rolls_back(box: Box, bundles: dict[str, Path]) -> None:
    box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0")
    box.desire("1.1.0", health_studies=3, health_deadline_s=600)
    wait_until(lambda: box.agent.rows.get("tiny").state == UpdateState.HEALTH_GATE, timeout=60, what="probation")  # type: ignore[union-attr]
    box.agent.on_outcome("tiny", "1.1.0", "RuntimeError: CUDA error")
    doc = box.wait_end("1.1.0")
    assert doc["state"] == "rolled_back" and "CUDA error" in doc["reason"]
    assert box.active() == "1.0.0"


# ---------------------------------------------------------------- bad input: the active model keeps serving


def test_tampered_target_is_refused(box: Box, bundles: dict[str, Path]) -> None:
    served = box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0")
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0xFF
    box.server.faults[served.name] = Fault(body=bytes(data))
    box.desire("1.1.0")
    _assert_kept(box, box.wait_end("1.1.0"), "target_mismatch")


def test_hash_mismatch_with_tuf_metadata_is_refused(box: Box, bundles: dict[str, Path]) -> None:
    served = box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0")
    other = bundles["1.2.0"].read_bytes()
    size = served.stat().st_size
    box.server.faults[served.name] = Fault(body=(other + b"\0" * size)[:size])  # right length, other content
    box.desire("1.1.0")
    _assert_kept(box, box.wait_end("1.1.0"), "target_mismatch")


def test_wrong_length_is_cut_at_the_signed_length(box: Box, bundles: dict[str, Path]) -> None:
    served = box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0")
    box.server.faults[served.name] = Fault(body=served.read_bytes() + b"extra")
    box.desire("1.1.0")
    _assert_kept(box, box.wait_end("1.1.0"), "too_long")


def test_endless_download_is_cut(box: Box, bundles: dict[str, Path]) -> None:
    served = box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0")
    box.server.faults[served.name] = Fault(endless=True)
    box.desire("1.1.0")
    _assert_kept(box, box.wait_end("1.1.0"), "too_long")
    assert not any((box.settings.state_dir / "updates" / "partial").iterdir())


def test_expired_metadata_freeze_attack_is_refused(box: Box, bundles: dict[str, Path]) -> None:
    box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0", timestamp_expires_days=-1)
    box.desire("1.1.0")
    _assert_kept(box, box.wait_end("1.1.0"), "metadata_expired")


def test_rolled_back_metadata_is_refused(box: Box, bundles: dict[str, Path]) -> None:
    box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0")
    box.desire("1.1.0", health_studies=0)
    assert box.wait_end("1.1.0")["state"] == "active"  # the box has now seen timestamp version N
    box.repo.publish(bundles["1.2.0"], "tiny", "1.2.0")
    box.repo.write_timestamp(version=1)  # an attacker replays an older timestamp version
    box.desire("1.2.0")
    doc = box.wait_end("1.2.0")
    assert doc["state"] == "failed" and "metadata_rollback" in doc["reason"]
    assert box.active() == "1.1.0"


def test_metadata_signed_by_an_unknown_key_is_refused(box: Box, bundles: dict[str, Path]) -> None:
    from securesystemslib.signer import CryptoSigner

    box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0", targets_signer=CryptoSigner.generate_ed25519())
    box.desire("1.1.0")
    _assert_kept(box, box.wait_end("1.1.0"), "metadata_signature")


def test_root_rotation_is_followed_and_a_retired_key_refused(box: Box, bundles: dict[str, Path]) -> None:
    box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0")
    box.desire("1.1.0", health_studies=0)
    assert box.wait_end("1.1.0")["state"] == "active"
    retired = box.repo.rotate_key("targets")  # root v2 names a new targets key, the box walks 1 -> 2
    box.repo.publish(bundles["1.2.0"], "tiny", "1.2.0", targets_signer=retired)  # signed with the retired key
    box.desire("1.2.0", health_studies=0)
    doc = box.wait_end("1.2.0")
    assert doc["state"] == "failed" and "metadata_signature" in doc["reason"], doc
    assert box.active() == "1.1.0"
    assert (box.settings.state_dir / "updates" / "metadata" / "root_history" / "2.root.json").exists()
    box.repo.commit()  # the genuine targets key signs again
    box.desire("1.1.0", health_studies=0)  # (a new target is needed to try again: the director moves)
    box.desire("1.2.0", health_studies=0)
    assert box.wait_end("1.2.0")["state"] == "active" and box.active() == "1.2.0"


def test_repository_over_https_with_the_test_ca(
    tmp_path: Path, keys: dict[str, Any], bundles: dict[str, Path], pki: dict[str, Path]
) -> None:
    with make_box(tmp_path, keys, bundles, tls=(pki["server_crt"], pki["server_key"]), ca_file=pki["ca"]) as b:
        assert b.server.url.startswith("https://")
        b.repo.publish(bundles["1.1.0"], "tiny", "1.1.0")
        b.desire("1.1.0", health_studies=0)
        assert b.wait_end("1.1.0")["state"] == "active"


def test_repository_with_an_untrusted_certificate_is_not_used(
    tmp_path: Path, keys: dict[str, Any], bundles: dict[str, Path], pki: dict[str, Path]
) -> None:
    with make_box(tmp_path, keys, bundles, tls=(pki["server_crt"], pki["server_key"])) as b:  # system CAs only
        b.repo.publish(bundles["1.1.0"], "tiny", "1.1.0")
        b.desire("1.1.0", health_studies=0)
        doc = wait_until(
            lambda: (d := b.last()) and "CERTIFICATE_VERIFY_FAILED" in (d["reason"] or "") and d, timeout=20, what="why"
        )
        assert doc["state"] == "downloading" and doc["bytes"] == 0  # it waits and retries; never goes on
        assert b.server.target_requests() == [] and b.active() == "1.0.0"


@pytest.mark.parametrize(("bundle", "reason"), [("unknown_key", "unknown_key"), ("revoked_key", "revoked_key")])
def test_bundle_signed_by_unknown_or_revoked_key_is_refused(
    box: Box, bundles: dict[str, Path], bundle: str, reason: str
) -> None:
    version = {"unknown_key": "1.5.0", "revoked_key": "1.6.0"}[bundle]
    box.repo.publish(bundles[bundle], "tiny", version)  # genuine in TUF: the bundle's own signature still counts
    box.desire(version)
    _assert_kept(box, box.wait_end(version), reason)


def test_downgrade_below_the_highest_ever_installed_is_refused(box: Box, bundles: dict[str, Path]) -> None:
    box.repo.publish(bundles["0.9.0"], "tiny", "0.9.0")
    box.desire("0.9.0")
    _assert_kept(box, box.wait_end("0.9.0"), "downgrade")


def test_bundle_for_another_task_is_refused_before_downloading(box: Box, bundles: dict[str, Path]) -> None:
    box.repo.publish(bundles["other_task"], "tiny", "1.4.0")
    box.desire("1.4.0")
    _assert_kept(box, box.wait_end("1.4.0"), "wrong_task")
    assert box.server.target_requests() == []  # the signed custom.task said so


def test_bundle_for_another_task_is_refused_by_its_manifest_too(box: Box, bundles: dict[str, Path]) -> None:
    box.repo.publish(bundles["other_task"], "tiny", "1.4.0", commit=False)
    del box.repo.targets.signed.targets["tiny/tiny-1.4.0.bundle"].unrecognized_fields["custom"]["task"]
    box.repo.commit()  # a repository whose metadata does not say the task: the manifest still does
    box.desire("1.4.0")
    _assert_kept(box, box.wait_end("1.4.0"), "wrong_task")
    assert len(box.server.target_requests()) == 1


def test_target_whose_manifest_is_not_the_signed_one_is_refused(box: Box, bundles: dict[str, Path]) -> None:
    box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0", commit=False)
    box.repo.targets.signed.targets["tiny/tiny-1.1.0.bundle"].unrecognized_fields["custom"]["manifest_sha256"] = (
        "0" * 64
    )
    box.repo.commit()
    box.desire("1.1.0")
    _assert_kept(box, box.wait_end("1.1.0"), "manifest_mismatch")


def test_director_back_to_the_running_version_halts_the_update(box: Box, bundles: dict[str, Path]) -> None:
    box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0")
    box.desire("1.1.0", window="00:00-00:01" if dt.datetime.now().hour else "12:00-12:01")  # held back
    wait_until(lambda: box.states() == ["waiting_window"], timeout=10, what="waiting")
    box.desire("1.0.0")  # halt: the version it runs
    doc = box.wait_end("1.0.0")
    assert doc["state"] == "active" and box.active() == "1.0.0"
    assert box.server.target_requests() == []


def test_full_disk_is_refused_before_downloading(box: Box, bundles: dict[str, Path]) -> None:
    box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0")
    box.settings.updates.compile_headroom_bytes = 1 << 60  # more than any disk has free
    box.desire("1.1.0")
    _assert_kept(box, box.wait_end("1.1.0"), "disk_full")
    assert box.server.target_requests() == []  # not one byte fetched


def test_desired_version_that_does_not_exist(box: Box, bundles: dict[str, Path]) -> None:
    box.desire("7.7.7")
    _assert_kept(box, box.wait_end("7.7.7"), "unknown_version")


# ---------------------------------------------------------------- the director document (no network)


@pytest.mark.parametrize(
    "doc",
    [
        {"bundles": {"Tiny!": {"version": "1.0.0"}}},
        {"bundles": {"tiny": {"version": "latest"}}},
        {"bundles": {"tiny": {"version": "1.0.0", "extra": 1}}},
        {"policy": {"window": "25:00-03:00"}},
        {"policy": {"health_studies": -1}},
        [],
    ],
)
def test_invalid_director_documents_are_rejected(doc: Any) -> None:
    with pytest.raises(ValueError):
        parse_director(doc)


@pytest.mark.parametrize(
    ("window", "hour", "inside"),
    [("01:00-05:00", 3, True), ("01:00-05:00", 5, False), ("22:00-02:00", 23, True), ("22:00-02:00", 12, False)],
)
def test_maintenance_window(window: str, hour: int, inside: bool) -> None:
    assert Policy(window=window).in_window(dt.datetime(2026, 1, 1, hour, 0)) is inside


def test_outside_the_window_the_update_waits(box: Box, bundles: dict[str, Path]) -> None:
    box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0")
    now = dt.datetime.now()
    shut = f"{(now.hour + 2) % 24:02d}:00-{(now.hour + 3) % 24:02d}:00"
    box.desire("1.1.0", window=shut)
    wait_until(lambda: box.states() == ["waiting_window"], timeout=10, what="waiting_window reported")
    box.agent._wake.set()
    assert box.agent.rows.get("tiny").state == UpdateState.WAITING_WINDOW  # type: ignore[union-attr]
    assert box.server.target_requests() == [] and box.active() == "1.0.0"
    box.desire("1.1.0", health_studies=0)  # the director opens the window (policy only)
    assert box.wait_end("1.1.0")["state"] == "active"


def test_a_slow_download_of_one_bundle_does_not_hold_back_another_s_rollback(
    tmp_path: Path, keys: dict[str, Any], bundles: dict[str, Path]
) -> None:
    """A repository that trickles a target (a bad link, or a hostile server staying under the read timeout) must
    not keep a failing model serving: the rollback of a bundle on probation interrupts another's download."""
    other = {v: make_bundle(tmp_path / "b", keys["good"], bundle_id="tiny2", version=v) for v in ("1.0.0", "1.1.0")}
    with make_box(tmp_path, keys, bundles) as box:
        reg = registry(box.settings)
        runtime.install_bundle(box.settings.models_dir, other["1.0.0"], reg.trust, runtime.EngineOptions("ort"))
        box.repo.publish(bundles["1.1.0"], "tiny", "1.1.0", commit=False)
        slow = box.repo.publish(other["1.1.0"], "tiny2", "1.1.0")
        box.desire("1.1.0", health_studies=3, health_deadline_s=600)
        wait_until(lambda: box.agent.rows.get("tiny").state == UpdateState.HEALTH_GATE, timeout=60, what="probation")  # type: ignore[union-attr]
        box.server.faults[slow.name] = Fault(trickle_s=4.0, times=1)  # 256 bytes per 4 s (under the read timeout)
        box.desire("1.1.0", bundle_id="tiny2", health_studies=0)
        wait_until(lambda: (r := box.agent.rows.get("tiny2")) is not None and r.bytes > 0, timeout=60, what="trickle")
        box.agent.on_outcome("tiny", "1.1.0", "RuntimeError: CUDA error")
        doc = box.wait_end("1.1.0", timeout=30)  # the trickle alone lasts about a minute
        assert doc["state"] == "rolled_back" and box.active() == "1.0.0"
        row2 = box.agent.rows.get("tiny2")
        assert row2 is not None and row2.bytes < slow.stat().st_size  # the slow download had not finished

        def tiny2_ended() -> Any:
            r = box.agent.rows.get("tiny2")
            return r if r is not None and str(r.state) in TERMINAL else None

        end = wait_until(tiny2_ended, timeout=120, what="tiny2 update ends")
        assert str(end.state) == "active"  # resumed after the rollback and finished
        assert reg.active_version("tiny2") == "1.1.0"
        assert [rng for p, rng in box.server.target_requests() if "tiny2" in p][0] is None
        assert any(rng for p, rng in box.server.target_requests() if "tiny2" in p)  # resumed with Range
