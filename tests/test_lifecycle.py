"""The study lifecycle (``appliance.lifecycle``): the transition table, compare-and-set, bounded attempts,
startup recovery, and result-building faults contained (unit level and through the real daemon).

The field case ``/work/shared/cases/cr_without_patient_orientation.py`` (a CR without Patient Orientation,
whose SC the result builder cannot make) is run to write the input when it is present; a copy of it
(``cr_without_orientation``, checked against the script) stands in where it is not.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest

from appliance.core.config import PacsDestination, Settings
from appliance.core.store import Store, now
from appliance.lifecycle import studies
from appliance.lifecycle.studies import (
    COMPLETE,
    EXPORTED,
    FAILED,
    INFERRED,
    INFERRING,
    RECEIVED,
    STUDY_STATES,
    TRANSITIONS,
)
from appliance.pipeline.recovery import recover
from appliance.pipeline.worker import PipelineWorker, StaticBundles
from engines.reference.phantoms import PatientInfo, chest_phantom, to_dicom, write_dicom
from tests.test_pipeline_e2e import install_tiny_bundle
from tests.test_worker import add_spooled_study
from testsupport.common import PYTHON, ROOT, wait_until
from testsupport.daemon import appliance_cli, running_daemon
from testsupport.dcmtk import storescu
from testsupport.orthanc import AET, Orthanc
from testsupport.pipeline import TinyEngine, tiny_manifest

SC_FAULT = "SC not built for image"


CASE_SCRIPT = ROOT.parent / "shared" / "cases" / "cr_without_patient_orientation.py"


def case_file(path: Path, empty: bool = False) -> Path:
    """The field case's file, written by the shared script itself when present, else by the copy below."""
    if not CASE_SCRIPT.exists():
        return cr_without_orientation(path, empty)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = [str(path), "empty"] if empty else [str(path)]
    subprocess.run([PYTHON, str(CASE_SCRIPT), *args], cwd=ROOT, check=True, timeout=120)
    return path


def cr_without_orientation(path: Path, empty: bool = False) -> Path:
    """The field case: CR chest PA with Patient Orientation (0020,0020) missing (or present and empty)."""
    ph = chest_phantom(320, 256, seed=1, nodules=1)
    ds = to_dicom(
        ph.pixels, modality="CR", photometric="MONOCHROME2", patient=PatientInfo(name="CASE^ORIENT", patient_id="C02")
    )
    if empty:
        ds.PatientOrientation = ""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dicom(ds, str(path))
    return path


def _study_in(store: Store, state: str, attempts: int = 0) -> int:
    """A study row put straight into ``state`` (test set-up only; the code moves states through transitions)."""
    ts = now()
    with store.transaction() as conn:
        sid = studies.open_revision(conn, pydicom.uid.generate_uid(), 1, "CR", "T", "first instance", ts)
        conn.execute("UPDATE studies SET state=?, attempts=? WHERE id=?", (state, attempts, sid))
    return sid


def _row(store: Store, sid: int) -> dict:
    return dict(store.query("SELECT state, detail, attempts FROM studies WHERE id=?", (sid,))[0])


def _events(store: Store, sid: int) -> list[tuple[str | None, str]]:
    rows = store.query("SELECT from_state, to_state FROM study_events WHERE study_id=? ORDER BY id", (sid,))
    return [(r["from_state"], r["to_state"]) for r in rows]


# -- the transition table -----------------------------------------------------------------------------------------


def test_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(STUDY_STATES)
    assert all(to <= set(STUDY_STATES) for to in TRANSITIONS.values())
    assert TRANSITIONS[studies.PURGED] == frozenset()


@pytest.mark.parametrize("src", STUDY_STATES)
def test_every_transition_is_allowed_or_refused_as_the_table_says(home: Path, src: str) -> None:
    store = Store(home / "state.db")
    for dst in STUDY_STATES:
        sid = _study_in(store, src)
        before = _events(store, sid)
        if dst in TRANSITIONS[src]:
            with store.transaction() as conn:
                studies.transition(conn, sid, src, dst, f"{src} to {dst}")
            assert _row(store, sid)["state"] == dst
            assert _events(store, sid) == [*before, (src, dst)]
        else:
            with pytest.raises(studies.IllegalTransition) as exc, store.transaction() as conn:
                studies.transition(conn, sid, src, dst, "must not happen")
            assert not isinstance(exc.value, studies.LostRace)
            assert f"{src} -> {dst}" in str(exc.value)
            assert _row(store, sid)["state"] == src and _events(store, sid) == before


def test_unknown_state_and_missing_study_are_refused(home: Path) -> None:
    store = Store(home / "state.db")
    sid = _study_in(store, RECEIVED)
    with pytest.raises(studies.IllegalTransition, match="unknown state"), store.transaction() as conn:
        studies.transition(conn, sid, RECEIVED, "bogus")
    with pytest.raises(studies.LostRace, match="no such study"), store.transaction() as conn:
        studies.transition(conn, sid + 100, RECEIVED, COMPLETE)


def test_compare_and_set_loses_a_race_and_writes_nothing(home: Path) -> None:
    """Two threads (two connections) both try to start inferring the same study: exactly one wins."""
    store = Store(home / "state.db")
    sid = _study_in(store, COMPLETE)
    barrier = threading.Barrier(2)
    outcomes: list[object] = []

    def contender() -> None:
        barrier.wait()
        try:
            with store.transaction() as conn:
                outcomes.append(studies.begin_inference(conn, sid, 3))
        except studies.LostRace as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=contender) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(map(type, outcomes), key=str) == sorted([bool, studies.LostRace], key=str)
    lost = next(o for o in outcomes if isinstance(o, studies.LostRace))
    assert lost.actual == INFERRING and "expected complete, it is inferring now" in str(lost)
    assert _row(store, sid)["attempts"] == 1
    assert _events(store, sid) == [(None, RECEIVED), (COMPLETE, INFERRING)]
    # a stale writer (read "complete" before the move) cannot overwrite it either
    with pytest.raises(studies.LostRace), store.transaction() as conn:
        studies.transition(conn, sid, COMPLETE, FAILED, "stale")
    assert _row(store, sid)["state"] == INFERRING


# -- bounded attempts and startup recovery ------------------------------------------------------------------------


def test_interrupted_study_is_retried_then_failed_after_max_attempts(home: Path) -> None:
    """Each restart finds the study ``inferring`` (the process died in it): retried until it has used
    ``pipeline.max_attempts``, then ended ``failed`` with the reason; never a loop."""
    settings = Settings(state_dir=home)
    settings.pipeline.max_attempts = 3
    store = Store(settings.db_path)
    sid = _study_in(store, COMPLETE)
    for attempt in range(1, 4):
        with store.transaction() as conn:
            assert studies.begin_inference(conn, sid, settings.pipeline.max_attempts)
        # ... the process dies here; the next start recovers:
        got = recover(settings, store)
        if attempt < 3:
            assert (got.retried, got.failed) == (1, 0)
            assert _row(store, sid)["state"] == COMPLETE
    row = _row(store, sid)
    assert row["state"] == FAILED and row["attempts"] == 3
    assert "interrupted during inference" in row["detail"] and "gave up after 3 attempt(s)" in row["detail"]
    assert recover(settings, store).interrupted == 0  # nothing left to recover


def test_complete_study_with_attempts_used_up_is_failed_not_started(home: Path) -> None:
    settings = Settings(state_dir=home)
    store = Store(settings.db_path)
    sid = _study_in(store, COMPLETE, attempts=settings.pipeline.max_attempts)
    with store.transaction() as conn:
        assert not studies.begin_inference(conn, sid, settings.pipeline.max_attempts)
    assert _row(store, sid)["state"] == FAILED and "gave up after 3 attempt(s)" in _row(store, sid)["detail"]


def test_recovery_exports_an_inferred_study_whose_exports_are_all_done(home: Path) -> None:
    settings = Settings(state_dir=home)
    settings.pipeline.destinations = [PacsDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=1)]
    store = Store(settings.db_path)
    done, waiting, unqueued = (_study_in(store, INFERRED) for _ in range(3))
    ts = now()
    with store.transaction() as conn:
        for sid in (done, waiting, unqueued):
            rid = conn.execute(
                "INSERT INTO results(study_id, study_uid, bundle_id, bundle_version, summary, dir, created_at)"
                " VALUES (?, 'x', 'b', '1', '{}', '/nowhere', ?)",
                (sid, ts),
            ).lastrowid
            oid = conn.execute(
                "INSERT INTO result_objects(result_id, kind, sop_instance_uid, sop_class_uid, path)"
                " VALUES (?, 'SR', ?, '1.2', '/nowhere/sr.dcm')",
                (rid, f"1.2.3.{sid}"),
            ).lastrowid
            if sid != unqueued:
                conn.execute(
                    "INSERT INTO exports(object_id, study_id, destination, state, next_attempt_at, created_at)"
                    " VALUES (?,?,?,?,?,?)",
                    (oid, sid, "pacs", "done" if sid == done else "pending", ts, ts),
                )
    got = recover(settings, store)
    assert (got.exported, got.requeued) == (1, 1)
    assert _row(store, done)["state"] == EXPORTED
    assert _row(store, waiting)["state"] == INFERRED
    assert [r["state"] for r in store.query("SELECT state FROM exports WHERE study_id=?", (unqueued,))] == ["pending"]


def test_worker_crash_is_retried_then_failed(home: Path) -> None:
    """An exception outside the per-bundle handling (here: the bundle source itself) sends the study back
    for another attempt, then ends it ``failed`` after ``max_attempts``: the running worker never loops."""

    class Exploding:
        def active(self):
            raise OSError("registry unreadable")

        def close(self) -> None:
            return None

    settings = Settings(state_dir=home)
    settings.pipeline.poll_s = 0.05
    store = Store(settings.db_path)
    sid = add_spooled_study(store, home / "spool", [pydicom.dcmread(cr_without_orientation(home / "in" / "a.dcm"))])
    worker = PipelineWorker(settings, store, Exploding())
    worker.start()
    try:
        wait_until(lambda: _row(store, sid)["state"] == FAILED, timeout=20, what="failed")
    finally:
        worker.stop()
    row = _row(store, sid)
    assert row["attempts"] == 3 and "OSError: registry unreadable" in row["detail"]
    assert _events(store, sid).count((COMPLETE, INFERRING)) == 3


# -- result building that raises -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_sc_builder_fault_keeps_the_sr_and_names_the_image(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The field case that used to break the SC builder builds now (issue 10); the containment still matters
    for whatever input breaks it next, so the fault is injected into the SC builder here."""
    import appliance.pipeline.results as results

    def broken_sc(*_args, **_kwargs):
        raise ValueError("'' is not a valid PatientOrientationValuesBiped")

    monkeypatch.setattr(results, "build_sc", broken_sc)
    settings = Settings(state_dir=home)
    store = Store(settings.db_path)
    ds = pydicom.dcmread(case_file(home / "in" / "cr.dcm", empty=True))
    sid = add_spooled_study(store, home / "spool", [ds])
    worker = PipelineWorker(settings, store, StaticBundles([(tiny_manifest(), TinyEngine())]))
    assert worker.process(sid) == INFERRED
    row = _row(store, sid)
    assert SC_FAULT in row["detail"] and ds.SOPInstanceUID in row["detail"]
    assert [r["kind"] for r in store.query("SELECT kind FROM result_objects")] == ["SR"]
    summary = store.query("SELECT summary FROM results")[0]["summary"]
    assert '"object_errors"' in summary and '"partial"' not in summary


def test_sr_builder_fault_ends_the_study_failed_with_the_reason(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No real input is known to break the SR builder, so the fault is injected there: the study must end
    ``failed`` with the reason, nothing queued, and not stay ``inferring``."""
    import appliance.pipeline.results as results

    def broken_sr(*_args, **_kwargs):
        raise ValueError("content item refused")

    monkeypatch.setattr(results, "build_sr", broken_sr)
    settings = Settings(state_dir=home)
    store = Store(settings.db_path)
    ds = pydicom.dcmread(cr_without_orientation(home / "in" / "cr.dcm"))
    sid = add_spooled_study(store, home / "spool", [ds])
    worker = PipelineWorker(settings, store, StaticBundles([(tiny_manifest(), TinyEngine())]))
    assert worker.process(sid) == FAILED
    assert "results not built: ValueError: content item refused" in _row(store, sid)["detail"]
    assert store.query("SELECT COUNT(*) AS n FROM exports")[0]["n"] == 0


# -- through the real daemon ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_daemon_delivers_the_field_case_and_does_not_reprocess_after_restart(home: Path, tmp_path: Path) -> None:
    """storescu -> daemon (tiny bundle) -> Orthanc with the field case (a CR without Patient Orientation,
    which once crashed the SC builder and left the study ``inferring``): the SR and the SC reach the PACS,
    the study ends ``exported`` with nothing left out, shown by ``appliance studies``; a restart neither
    re-processes it nor crashes."""
    pacs = Orthanc(tmp_path / "pacs").start()
    try:
        kid, pub = install_tiny_bundle(home, tmp_path / "bundle")
        cfg = (
            f'[engines]\ntrusted_keys = {{ "{kid}" = "{pub}" }}\n'
            "[pipeline]\nenabled = true\npoll_s = 0.2\nretry_initial_s = 0.5\n"
            f'[[pipeline.destinations]]\nname = "pacs"\nae_title = "{AET}"\nhost = "127.0.0.1"\n'
            f"port = {pacs.dicom_port}\n"
        )
        path = case_file(tmp_path / "in" / "cr.dcm")
        ds = pydicom.dcmread(path)
        env = {"APPLIANCE_PIPELINE__ENABLED": "true"}
        with running_daemon(home, config_toml=cfg, env=env) as d:
            sent = storescu(d.port, [path])
            assert sent.returncode == 0, sent.stdout
            rows = wait_until(lambda: d.studies(EXPORTED), timeout=90, what="exported")
            assert SC_FAULT not in rows[0]["detail"] and "left out" not in rows[0]["detail"], rows[0]["detail"]
            shown = d.cli("studies", "--json")
            assert shown.returncode == 0 and json.loads(shown.stdout)[0]["state"] == EXPORTED
            table = appliance_cli(home, "studies", env={**d.env, "COLUMNS": "1000"})
            assert EXPORTED in table.stdout, table.stdout
            events = len(d.query("SELECT id FROM study_events"))
            assert d.stop() == 0
        in_pacs = sorted(t.get("Modality") for t in pacs.instances_of_study(ds.StudyInstanceUID))
        assert in_pacs == ["OT", "SR"]
        with running_daemon(home, config_toml=cfg, env=env) as d2:
            wait_until(lambda: "pipeline ready" in d2.logs(), timeout=60, what="pipeline ready")
            assert d2.studies()[0]["state"] == EXPORTED and len(d2.query("SELECT id FROM study_events")) == events
            assert d2.alive()
            assert d2.stop() == 0
            assert "Traceback" not in d2.logs() and "pipeline crashed" not in d2.logs()
    finally:
        pacs.stop()


@pytest.mark.integration
def test_shared_field_case_script_still_matches_the_copy(tmp_path: Path) -> None:
    """The copy above writes what the shared case script writes (when that script is present)."""
    if not CASE_SCRIPT.exists():
        pytest.skip("shared field cases not present on this machine")
    theirs = pydicom.dcmread(case_file(tmp_path / "case.dcm"))
    ours = pydicom.dcmread(cr_without_orientation(tmp_path / "ours.dcm"))
    assert "PatientOrientation" not in theirs and "PatientOrientation" not in ours
    assert theirs.PixelData == ours.PixelData and theirs.Modality == ours.Modality == "CR"
