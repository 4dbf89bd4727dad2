"""Paths from the network never become paths unchecked: hostile Study Instance UIDs (over storescu and directly)
write nothing outside the state directory, stored paths are relative, and retention never deletes outside it."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import time
from importlib import resources
from pathlib import Path

import pydicom
import pytest

from appliance.core.config import Settings
from appliance.core.safe_names import UnsafePath, relative_to, resolve_under, safe_name
from appliance.core.store import Store
from appliance.lifecycle.studies import PURGED
from appliance.pipeline.results import result_dir
from appliance.retention.purge import purge_due
from engines.manifest import Manifest
from engines.reference import phantoms
from testsupport.common import wait_until
from testsupport.daemon import running_daemon
from testsupport.dcmtk import storescu, storescu_results

HOSTILE = [
    "../../X",
    "../../../../../../tmp/escape",
    "/abs/olute",
    "..",
    ".",
    "",
    "1.2.3/../../..",
    "1" * 65,
    "9" * 4000,
    "1.2\x00/../x",
    "1.2.\u202e3",
    "é/..",
    "C:\\windows",
    "a\nb",
    "_" + "0" * 64,
]
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,64}\Z")


@pytest.mark.unit
@pytest.mark.parametrize("value", HOSTILE)
def test_safe_name_maps_every_hostile_value_to_one_plain_component(value: str) -> None:
    name = safe_name(value)
    assert NAME.match(name) and ".." not in name and "/" not in name, name
    assert name == safe_name(value)  # deterministic
    assert name.startswith("_") and len(name) == 65  # hashed: none of these is a plain name
    root = Path("/state/results")
    assert (root / name).parent == root


@pytest.mark.unit
def test_conformant_uids_pass_through_and_hashed_names_never_collide_with_plain_ones() -> None:
    uid = "1.2.826.0.1.3680043.10.1138.27609026848278877923255406718919488"
    assert safe_name(uid) == uid and safe_name("cxr-phantom-1.0.1") == "cxr-phantom-1.0.1"
    hashed = safe_name("../x")
    assert safe_name(hashed) != hashed  # a value that looks like a hashed name is hashed itself
    assert len({safe_name(v) for v in HOSTILE}) == len(HOSTILE)


@pytest.mark.unit
def test_resolve_under_refuses_absolute_escaping_and_linked_paths(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / "results").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "results" / "link").symlink_to(tmp_path / "outside")
    assert resolve_under(root, "results/a/b.dcm") == root / "results" / "a" / "b.dcm"
    for bad in ("/etc/passwd", "../outside", "results/../../outside", "results/link/x", "", "a\x00b", str(root)):
        with pytest.raises(UnsafePath):
            resolve_under(root, bad)
    assert relative_to(root, root / "results" / "a") == "results/a"
    with pytest.raises(UnsafePath):
        relative_to(root, tmp_path / "outside")


@pytest.mark.unit
@pytest.mark.parametrize("value", HOSTILE)
def test_result_dir_of_a_hostile_study_uid_stays_in_results(value: str, tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state")
    manifest = Manifest.model_construct(bundle_id="cxr-phantom", version="1.0.1")
    d = result_dir(settings, value, manifest)
    assert d.parent.parent == settings.results_dir
    assert resolve_under(settings.results_dir, os.path.relpath(d, settings.results_dir)) == d


def _hostile_copy(src: Path, out: Path, study_uid: str) -> Path:
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = f"2.25.{int.from_bytes(hashlib.sha256(study_uid.encode()).digest()[:8], 'big')}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.integration
def test_hostile_study_uids_over_storescu_stay_in_the_state_dir_and_retention_stays_there(
    tmp_path: Path,
) -> None:
    """A DICOM sender chooses the Study Instance UID: a relative escape, an absolute path into a folder beside the
    state directory, an over-long value and unicode. None is a valid UID (PS3.5 9.1), so each is refused at receive
    (0xC214, issue 16) and nothing of it is written anywhere; a valid one sent with them is stored and analysed.
    Everything received and every result lands inside the state directory; the stored result paths are relative;
    retention purges them and touches nothing outside. (``safe_name`` still maps any UID to a safe path component:
    the unit tests above.)"""
    world = tmp_path / "world"  # everything the test can see: the state dir and its neighbours
    home = world / "deep" / "er" / "home"
    home.mkdir(parents=True)
    target = world / "target"  # where an absolute UID would have aimed
    uids = ["../../../X", f"{target}/abs", "1." + "7" * 120, "1.2.3.\u00e9/../.."]
    good_uid = "1.2.826.0.1.3680043.10.1138.5.1"
    src = Path(phantoms.chest_study(tmp_path / "in", seed=5)["files"][0])
    files = [_hostile_copy(src, tmp_path / f"h{i}.dcm", uid) for i, uid in enumerate(uids)]
    good = _hostile_copy(src, tmp_path / "good.dcm", good_uid)
    before = _all_files(world)
    env = {"APPLIANCE_PIPELINE__ENABLED": "true", "APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES": "true"}
    with running_daemon(home, env=env) as d:
        out = storescu(d.port, [*files, good])
        answers = storescu_results(out.stdout)
        assert answers[str(good)] == "Success", out.stdout
        assert all(answers[str(f)] not in ("", "Success") for f in files), answers
        assert {r["study_uid"] for r in d.instances()} == {good_uid}
        settled = ("inferred", "no_model", "not_processable", "failed")
        try:
            wait_until(lambda: sum(len(d.studies(s)) for s in settled) == 1, timeout=180, what="settled")
        except AssertionError:
            raise AssertionError([dict(r) for r in d.studies()], d.logs()[-4000:]) from None
    outside_new = {  # the launcher's own log file sits beside the home
        p
        for p in _all_files(world) - before
        if home not in p.parents and p != home and not p.name.startswith("home-daemon-")
    }
    assert outside_new == set(), sorted(map(str, outside_new))
    assert not target.exists() and not (world / "X").exists() and not (world / "deep" / "X").exists()

    store = Store(home / "state.db")
    rows = store.query("SELECT study_uid, dir, dir_outside FROM results")
    assert {r["study_uid"] for r in rows} == {good_uid}  # analysed, its real UID kept in the database
    for r in rows:
        assert not Path(r["dir"]).is_absolute() and r["dir_outside"] == 0
        assert r["dir"].split("/")[:2] == ["results", safe_name(r["study_uid"])]
        assert (home / r["dir"]).is_dir() and any((home / r["dir"]).iterdir())
    for o in store.query("SELECT path FROM result_objects"):
        assert not Path(o["path"]).is_absolute() and (home / o["path"]).is_file()

    sentinel = world / "sentinel.txt"  # retention must never reach it
    sentinel.write_text("keep")
    settings = Settings(state_dir=home, retention={"days": 0.00001, "orphan_grace_s": 60})
    time.sleep(1.0)
    purged = purge_due(settings, store, at=time.time() + 3600)
    assert len(purged) == 1
    assert {r["state"] for r in store.query("SELECT state FROM studies")} == {PURGED}
    assert not any((home / "results").rglob("*.dcm"))
    assert sentinel.read_text() == "keep" and src.is_file() and all(f.is_file() for f in files)


def _old_database(path: Path) -> None:
    """A state database as an earlier build left it (schema 6), with absolute result paths."""
    conn = sqlite3.connect(path)
    for entry in sorted(resources.files("appliance.core.migrations").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql") and int(entry.name[:4]) <= 6:
            conn.executescript(entry.read_text(encoding="utf-8"))
    conn.execute("PRAGMA user_version=6")
    conn.commit()
    conn.close()


@pytest.mark.unit
def test_migration_makes_result_paths_relative_and_flags_those_outside(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    outside = tmp_path / "X" / "cxr-1.0"
    outside.mkdir(parents=True)
    (outside / "sr-1.dcm").write_bytes(b"not ours to delete")
    inside = home / "results" / "1.2.3" / "cxr-1.0"
    inside.mkdir(parents=True)
    (inside / "sr-2.dcm").write_bytes(b"ours")
    _old_database(home / "state.db")
    conn = sqlite3.connect(home / "state.db")
    for sid, uid, d in ((1, "../../X", outside), (2, "1.2.3", inside)):
        conn.execute(
            "INSERT INTO studies(id, study_uid, revision, state, created_at, updated_at, last_instance_at)"
            " VALUES (?,?,1,'exported',0,0,0)",
            (sid, uid),
        )
        conn.execute(
            "INSERT INTO results(id, study_id, study_uid, bundle_id, bundle_version, summary, dir, created_at)"
            " VALUES (?,?,?,'cxr','1.0','{}',?,0)",
            (sid, sid, uid, str(d)),
        )
        conn.execute(
            "INSERT INTO result_objects(result_id, kind, sop_instance_uid, sop_class_uid, path) VALUES (?,?,?,?,?)",
            (sid, "SR", f"2.25.{sid}", "1.2.840.10008.5.1.4.1.1.88.34", str(next(d.iterdir()))),
        )
    conn.commit()
    conn.close()

    store = Store(home / "state.db")
    rows = {r["study_id"]: r for r in store.query("SELECT study_id, dir, dir_outside FROM results")}
    assert rows[2]["dir"] == "results/1.2.3/cxr-1.0" and rows[2]["dir_outside"] == 0
    assert rows[1]["dir"] == str(outside) and rows[1]["dir_outside"] == 1  # kept as it was, flagged
    objs = {r["result_id"]: r for r in store.query("SELECT result_id, path, path_outside FROM result_objects")}
    assert objs[2]["path"] == "results/1.2.3/cxr-1.0/sr-2.dcm" and objs[1]["path_outside"] == 1

    settings = Settings(state_dir=home, retention={"days": 1})
    assert sorted(purge_due(settings, store, at=time.time() + 86400 * 30)) == [1, 2]
    assert (outside / "sr-1.dcm").read_bytes() == b"not ours to delete"  # outside: never deleted
    assert not inside.exists()
    detail = store.query("SELECT detail FROM study_events WHERE study_id=1 AND to_state='purged'")[0]["detail"]
    assert "outside the state directory left" in detail
    assert store.query("SELECT COUNT(*) FROM result_objects WHERE path_outside=1")[0][0] == 1  # flagged row kept


@pytest.mark.unit
def test_offline_infer_writes_hostile_study_uids_inside_its_out_folder(tmp_path: Path) -> None:
    """None of the hostile values is a valid UID (PS3.5 9.1): each file is reported as an error and nothing is
    written for it (issue 16); the valid study beside them is written inside the out folder, named by safe_name."""
    from appliance.app.infer_offline import run_offline
    from appliance.pipeline.worker import StaticBundles
    from testsupport.pipeline import TinyEngine, make_dataset, save, synthetic_image, tiny_manifest

    world = tmp_path / "w"
    out = world / "a" / "out"
    uids = ["../../X", f"{world}/abs", "1.2.\u00e9/.."]
    good_uid = "1.2.826.0.1.3680043.10.1138.6.1"
    for i, uid in enumerate([*uids, good_uid]):
        ds = make_dataset(synthetic_image(200, 200, (100, 100), radius=8))
        ds.StudyInstanceUID = uid
        save(ds, tmp_path / "in" / f"{i}.dcm")
    report = run_offline(
        Settings(state_dir=tmp_path / "home"),
        [tmp_path / "in"],
        out,
        bundles=StaticBundles([(tiny_manifest(), TinyEngine())]),
    )
    errors = {Path(e["path"]).name: e["error"] for e in report["errors"]}
    assert set(errors) == {f"{i}.dcm" for i in range(len(uids))}
    assert all("StudyInstanceUID is not a valid UID" in e for e in errors.values())
    written = [Path(o["path"]) for s in report["studies"] for r in s["results"] for o in r["objects"]]
    assert len(written) == 2
    assert all(out in p.parents and p.parent.parent.name == safe_name(good_uid) for p in written)
    assert sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file()) == sorted(
        p.relative_to(world) for p in written
    )
