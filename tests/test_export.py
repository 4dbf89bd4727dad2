"""Export to a real Orthanc: delivery, PACS down -> retried -> delivered once, PACS rejecting, echo CLI."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from appliance.core.config import PacsDestination, Settings
from appliance.core.store import Store, now
from appliance.delivery.export import Exporter, backoff
from appliance.lifecycle import studies
from appliance.lifecycle.studies import EXPORTED, INFERRED, INFERRING
from appliance.pipeline.analyse import analyse
from appliance.pipeline.results import save_results
from testsupport.common import PYTHON, ROOT, wait_until
from testsupport.orthanc import AET, Orthanc
from testsupport.pipeline import TinyEngine, make_dataset, synthetic_image, tiny_manifest


def _settings(home: Path, pacs: Orthanc) -> Settings:
    s = Settings(state_dir=home)
    s.pipeline.destinations = [PacsDestination(name="pacs", ae_title=AET, host="127.0.0.1", port=pacs.dicom_port)]
    s.pipeline.retry_initial_s = 0.5
    s.pipeline.export_timeout_s = 5
    return s


def add_study(store: Store, study_uid: str, state: str = INFERRING) -> int:
    """A study row as the worker has it while it saves results (``inferring``)."""
    ts = now()
    with store.transaction() as conn:
        cur = conn.execute(
            "INSERT INTO studies(study_uid, state, created_at, updated_at, last_instance_at) VALUES (?,?,?,?,?)",
            (study_uid, state, ts, ts, ts),
        )
        return int(cur.lastrowid)


def _results(settings: Settings, store: Store) -> tuple[str, int]:
    ds = make_dataset(synthetic_image(400, 300, (100, 200), radius=12))
    m = tiny_manifest()
    a = analyse([ds], m, TinyEngine().infer, 8, 10**8)
    study_id = add_study(store, ds.StudyInstanceUID)
    save_results(settings, store, study_id, a, m)
    mark_inferred(store, study_id)
    return ds.StudyInstanceUID, study_id


def mark_inferred(store: Store, study_id: int) -> None:
    """What the worker does once a study's results are saved."""
    with store.transaction() as conn:
        studies.transition(conn, study_id, INFERRING, INFERRED, "1 bundle(s)")


def _state(store: Store, study_id: int) -> str:
    return store.query("SELECT state FROM studies WHERE id=?", (study_id,))[0]["state"]


def test_backoff_is_exponential_and_capped() -> None:
    assert [backoff(n, 5, 60) for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 40, 60]


@pytest.mark.integration
def test_results_reach_orthanc_in_the_same_study(home: Path, orthanc: Orthanc) -> None:
    settings = _settings(home, orthanc)
    store = Store(settings.db_path)
    study_uid, study_id = _results(settings, store)
    assert _state(store, study_id) == INFERRED
    summary = store.query("SELECT summary FROM results WHERE study_id=?", (study_id,))[0]["summary"]
    assert '"bundle_id": "tiny-cxr"' in summary and study_uid in summary
    exporter = Exporter(settings, store)
    exporter.start()
    try:
        got = orthanc.wait_for(
            lambda: len(orthanc.instances_of_study(study_uid)) == 2 and _state(store, study_id) == EXPORTED
        )
    finally:
        exporter.stop()
    assert got
    tags = orthanc.instances_of_study(study_uid)
    assert {t["Modality"] for t in tags} == {"SR", "OT"}
    sr_file = next(t for t in tags if t["Modality"] == "SR")
    sr = pydicom.dcmread(__import__("io").BytesIO(orthanc.instance_file(sr_file["_id"])))
    assert sr.StudyInstanceUID == study_uid
    # done rows are never sent again, even by a fresh exporter (restart)
    assert Exporter(settings, store).run_once(now() + 10_000) == 0


@pytest.mark.integration
def test_pacs_down_retried_then_delivered_once(home: Path, tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "down")  # ports chosen, not started
    settings = _settings(home, pacs)
    store = Store(settings.db_path)
    study_uid, study_id = _results(settings, store)
    exporter = Exporter(settings, store)
    assert exporter.run_once() == 0
    rows = store.query("SELECT attempts, next_attempt_at, last_error FROM exports")
    assert all(r["attempts"] == 1 and r["next_attempt_at"] > now() for r in rows)
    assert "association" in rows[0]["last_error"]
    assert exporter.run_once() == 0  # not due yet: no new attempt
    assert store.query("SELECT MAX(attempts) AS n FROM exports")[0]["n"] == 1
    pacs.start()
    try:
        # the appliance restarts: a new exporter over the same database picks the queue up
        assert Exporter(settings, store).run_once(now() + 60) == 2
        assert Exporter(settings, store).run_once(now() + 10_000) == 0
        assert len(pacs.instances_of_study(study_uid)) == 2
        assert _state(store, study_id) == EXPORTED
    finally:
        pacs.stop()


@pytest.mark.integration
def test_pacs_rejecting_keeps_results_and_retries(home: Path, tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "reject", reject=True).start()
    try:
        settings = _settings(home, pacs)
        store = Store(settings.db_path)
        study_uid, study_id = _results(settings, store)
        assert Exporter(settings, store).run_once() == 0
        rows = store.query("SELECT state, attempts, last_error FROM exports")
        assert all(r["state"] == "pending" and r["attempts"] == 1 for r in rows)
        assert any(w in rows[0]["last_error"] for w in ("rejected", "status 0x", "aborted"))  # Orthanc 1.10 aborts
        assert pacs.instances() == []
        assert _state(store, study_id) == INFERRED
        pacs.restart(reject=False)
        assert Exporter(settings, store).run_once(now() + 60) == 2
        assert len(pacs.instances_of_study(study_uid)) == 2
    finally:
        pacs.stop()


@pytest.mark.integration
def test_pacs_echo_cli(home: Path, orthanc: Orthanc, tmp_path: Path, clean_env) -> None:
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(
        f'state_dir = "{home}"\n[[pipeline.destinations]]\nname = "pacs"\nae_title = "{AET}"\n'
        f'host = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        f'[[pipeline.destinations]]\nname = "dead"\nae_title = "X"\nhost = "127.0.0.1"\nport = 9\n'
    )
    t0 = time.monotonic()
    ok = subprocess.run(
        [PYTHON, "-m", "appliance", "-c", str(cfg), "pacs", "echo", "pacs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "C-ECHO success" in ok.stdout
    bad = subprocess.run(
        [PYTHON, "-m", "appliance", "-c", str(cfg), "pacs", "echo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "dead" in bad.stdout and "C-ECHO success" in bad.stdout
    unknown = subprocess.run(
        [PYTHON, "-m", "appliance", "-c", str(cfg), "pacs", "echo", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 2 and "nope" in unknown.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.integration
def test_reprocessing_does_not_duplicate_in_pacs(home: Path, orthanc: Orthanc) -> None:
    """Same study processed twice (e.g. a restart after export): same UIDs, Orthanc keeps one copy each."""
    settings = _settings(home, orthanc)
    store = Store(settings.db_path)
    ds = make_dataset(synthetic_image(400, 300, (100, 200), radius=12))
    m = tiny_manifest()
    eng = TinyEngine()
    study_id = add_study(store, ds.StudyInstanceUID)
    for _ in range(2):
        a = analyse([ds], m, eng.infer, 8, 10**8)
        save_results(settings, store, study_id, a, m)
        store.conn.execute("UPDATE exports SET state='pending', next_attempt_at=0")
        Exporter(settings, store).run_once()
    assert len(orthanc.instances_of_study(ds.StudyInstanceUID)) == 2


@pytest.mark.integration
def test_sr_goes_out_before_the_scs_are_built(home: Path, orthanc: Orthanc) -> None:
    """The SR is queued (own transaction) and sent while the SCs are not yet built; the SCs follow."""
    settings = _settings(home, orthanc)
    store = Store(settings.db_path)
    ds = make_dataset(synthetic_image(400, 300, (100, 200), radius=12))
    m = tiny_manifest()
    a = analyse([ds], m, TinyEngine().infer, 8, 10**8)
    study_id = add_study(store, ds.StudyInstanceUID)
    exporter = Exporter(settings, store)
    exporter.start()
    seen: list = []

    def at_sr_queued() -> None:
        assert exporter.send_now(timeout=10)
        seen.append(store.query("SELECT o.kind, e.state FROM exports e JOIN result_objects o ON o.id=e.object_id"))
        seen.append(orthanc.instances_of_study(ds.StudyInstanceUID))

    try:
        save_results(settings, store, study_id, a, m, on_queued=at_sr_queued)
        mark_inferred(store, study_id)
        assert [(r["kind"], r["state"]) for r in seen[0]] == [("SR", "done")]  # SC not even queued yet
        assert len(seen[1]) == 1
        exporter.wake()
        wait_until(lambda: _state(store, study_id) == EXPORTED, timeout=20, what="study exported")
    finally:
        exporter.stop()
    assert len(orthanc.instances_of_study(ds.StudyInstanceUID)) == 2


@pytest.mark.integration
def test_crash_after_sr_queued_reprocesses_without_duplicates(home: Path, orthanc: Orthanc) -> None:
    """Killed between the SR's transaction and the SCs': the study is still not ``inferred``; the re-run
    queues the SCs, does not queue the SR again, and the result summary is complete."""
    settings = _settings(home, orthanc)
    store = Store(settings.db_path)
    ds = make_dataset(synthetic_image(400, 300, (100, 200), radius=12))
    m = tiny_manifest()
    study_id = add_study(store, ds.StudyInstanceUID)

    def crash() -> None:
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        save_results(settings, store, study_id, analyse([ds], m, TinyEngine().infer, 8, 10**8), m, on_queued=crash)
    assert _state(store, study_id) == INFERRING
    assert json.loads(store.query("SELECT summary FROM results")[0]["summary"]) == {"partial": True}
    assert Exporter(settings, store).run_once() == 1  # the SR
    save_results(settings, store, study_id, analyse([ds], m, TinyEngine().infer, 8, 10**8), m)
    mark_inferred(store, study_id)
    rows = store.query("SELECT o.kind, e.state FROM exports e JOIN result_objects o ON o.id=e.object_id ORDER BY e.id")
    assert [(r["kind"], r["state"]) for r in rows] == [("SR", "done"), ("SC", "pending")]
    assert "partial" not in json.loads(store.query("SELECT summary FROM results")[0]["summary"])
    assert Exporter(settings, store).run_once() == 1
    assert _state(store, study_id) == EXPORTED
    assert len(orthanc.instances_of_study(ds.StudyInstanceUID)) == 2


@pytest.mark.integration
def test_pacs_failure_status_keeps_results_and_retries(home: Path, tmp_path: Path) -> None:
    """A PACS that associates but answers each C-STORE with a failure status (0xA700, out of
    resources: a real storage SCP, the appliance's own, with its disk below the floor) keeps every row
    pending with that status; once it has room again the retry delivers each object once."""
    from appliance.core.config import DicomConfig
    from appliance.ingest.scp import StorageSCP
    from appliance.ingest.spool import Spool

    pacs = StorageSCP(
        DicomConfig(port=0, ae_title="FULLPACS", accept_all_storage=True, min_free_bytes=10**18),
        Store(tmp_path / "pacs" / "state.db"),
        Spool(tmp_path / "pacs" / "spool"),
    )
    pacs.start()
    try:
        settings = Settings(state_dir=home)
        settings.pipeline.destinations = [
            PacsDestination(name="pacs", ae_title="FULLPACS", host="127.0.0.1", port=pacs.address[1])
        ]
        # the test is about the failure status, not timeouts: room for a loaded CI machine (seen: a 5 s limit hit)
        settings.pipeline.export_timeout_s = 30
        store = Store(settings.db_path)
        study_uid, study_id = _results(settings, store)
        assert Exporter(settings, store).run_once() == 0
        rows = store.query("SELECT state, attempts, last_error FROM exports")
        assert len(rows) == 2
        assert all(r["state"] == "pending" and r["attempts"] == 1 for r in rows)
        assert all(r["last_error"] == "C-STORE status 0xA700" for r in rows), [dict(r) for r in rows]
        assert pacs.store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0
        assert _state(store, study_id) == INFERRED
        pacs.cfg = pacs.cfg.model_copy(update={"min_free_bytes": 0})  # the PACS has room again
        assert Exporter(settings, store).run_once(now() + 60) == 2
        assert Exporter(settings, store).run_once(now() + 10_000) == 0
        got = pacs.store.query("SELECT study_uid, modality FROM instances")
        assert sorted((r["study_uid"], r["modality"]) for r in got) == [(study_uid, "OT"), (study_uid, "SR")]
        assert _state(store, study_id) == EXPORTED
    finally:
        pacs.stop()
