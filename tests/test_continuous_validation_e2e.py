"""Issue 17's acceptance, end to end with real parts: two daemons (two sites with different twin tags ``site`` and
``setting``) receive phantom chest studies over DICOM (dcmtk's storescu) and analyse them with the shipped
cxr-phantom 1.0.2 bundle on ONNX Runtime; one site is shifted (another Manufacturer and a contrast change). Both
send their results and a ``stats`` snapshot (direct method ``send_stats``) through the fake IoT Hub over TLS,
which routes them as Avro into Azurite; a radiologist's feedback on one study, given through the dashboard (the
study page's form, a logged-in HTTPS session), arrives as a ``feedback`` message. Then ``appliance central
ingest --from <container URL>`` and ``appliance central report --json --bundle <the shipped bundle, whose manifest
carries the validation-set reference>``: the shifted site's score drift against the reference and the fleet is
flagged, the steady site's against the reference is not, the feedback is in the concordance table, and the same
report on Spark has DuckDB's numbers.

Expected values come from what was sent: the scores are read from the result messages the hub received
(decrypted here), the PSI is computed with numpy by the formula docs/CENTRAL.md documents, the reference from the
bundle's manifest read directly. The steady site receives the validation set the reference was built from
(``training.train.validation_reference``: 120 studies, seed 4242, the same draws), so a box that analyses as the
reference was built must reproduce it (PSI near 0). A subset would not do: with 20 bins and the epsilon floor, an
empty bin where the reference has a few scores costs ~0.2 by itself (the first 56 studies give 0.252 for nodule).
Both sites send at least ``min_studies`` (50) studies, so "not flagged" is not just "too few".
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from appliance.central import store_schema
from appliance.cloud import crypto
from engines.drift import ks_binned
from engines.reference.phantoms import PatientInfo, chest_phantom, chest_study, synthetic_uid, to_dicom, write_dicom
from tests.test_central_spark import assert_same_tables
from tests.test_web_daemon import client_for, user_cli
from testsupport.azurite import Azurite, azurite_binary
from testsupport.cloud import DEVICE, cloud_env
from testsupport.common import PYTHON, ROOT, wait_until
from testsupport.daemon import Daemon, daemon_env, running_daemon
from testsupport.dcmtk import have_dcmtk, storescu
from testsupport.fakehub import FakeHub
from testsupport.fakehub.routing import StorageEndpoint, container_sink

pytestmark = pytest.mark.integration

BUNDLE = ROOT / "engines" / "reference" / "bundles" / "cxr-phantom-1.0.2.bundle"
STEADY, SHIFTED = DEVICE, "clinic-0043"
TAGS = {
    STEADY: {"site": "nakuru-1", "region": "rift", "health_system": "moh-ke", "setting": "urban"},
    SHIFTED: {"site": "kitale-2", "region": "rift", "health_system": "moh-ke", "setting": "rural"},
}
N_STEADY, N_SHIFTED = 120, 52  # the reference's n; both above the report's default min_studies (50 per site-week)
PSI_ALERT, MIN_STUDIES, EPS = 0.25, 50, 1e-4  # docs/CENTRAL.md "Reports": defaults (the manifest has no `drift`)
EDGES = np.linspace(0.0, 1.0, 21)
PASSWORD = "acceptance-radiologist-1"


@pytest.fixture
def azurite(tmp_path: Path, pki: dict[str, Path]):
    if azurite_binary() is None:
        pytest.fail("azurite-blob not installed: run ./bootstrap.sh test (npm install) or set AZURITE_BLOB")
    with Azurite(tmp_path / "azurite", cert=pki["server_crt"], key=pki["server_key"]) as az:
        yield az


def validation_mix(rng: np.random.Generator) -> dict[str, Any]:
    """One study's findings drawn as ``training.train.validation_reference`` draws them (same order of draws)."""
    return {
        "nodules": int(rng.integers(0, 2)),
        "effusion": [None, "left", "right"][int(rng.integers(0, 3))],
        "cardiomegaly": bool(rng.random() < 0.3),
    }


def steady_studies(out: Path) -> list[dict[str, Any]]:
    """The validation set's ``N_STEADY`` studies (seed 4242), written as the reference's were."""
    rng = np.random.default_rng(4242)
    return [chest_study(out, seed=4242 + i, **validation_mix(rng)) for i in range(N_STEADY)]


def shifted_studies(out: Path) -> list[dict[str, Any]]:
    """Fresh studies of the same mix from a site that changed equipment: another Manufacturer and model, images
    with much less contrast (pixel values compressed to 0.55 + 0.25 x) and a 3x wider default VOI window."""
    rng = np.random.default_rng(9100)
    studies = []
    for i in range(N_SHIFTED):
        seed = 9100 + i
        ph = chest_phantom(320, 256, seed=seed, **validation_mix(rng))
        ds = to_dicom(
            0.55 + 0.25 * ph.pixels,
            modality="DX",
            patient=PatientInfo(patient_id=f"PH-S{seed}", accession=f"ACS{seed}"),
            study_uid=synthetic_uid("accept-shifted", seed),
            bits_stored=12,
            photometric="MONOCHROME2",
            pixel_spacing=(0.15, 0.15),
            body_part="CHEST",
            view_position="PA",
            patient_orientation=("L", "F"),
        )
        ds.Manufacturer, ds.ManufacturerModelName = "OtherVendor", "DR-9000"
        ds.WindowWidth = f"{float(ds.WindowWidth) * 3:.1f}"
        path = write_dicom(ds, out / f"s{seed}" / f"{ds.SOPInstanceUID}.dcm")
        studies.append({"study_uid": ds.StudyInstanceUID, "files": [str(path)]})
    return studies


def psi(p_counts: Any, q_counts: Any) -> float:
    """docs/CENTRAL.md: sum (p_i - q_i) ln(p_i / q_i), shares floored at 1e-4, no renormalisation."""
    p = np.maximum(np.asarray(p_counts, float) / np.sum(p_counts), EPS)
    q = np.maximum(np.asarray(q_counts, float) / np.sum(q_counts), EPS)
    return float(np.sum((p - q) * np.log(p / q)))


def central(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "appliance", "central", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_two_sites_drift_feedback_ingest_and_report_on_duckdb_and_spark(
    tmp_path: Path, hub: FakeHub, azurite: Azurite, pki, device_key: str, central_keys
) -> None:
    if not have_dcmtk():
        pytest.skip("dcmtk is not installed")
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(azurite.connection_string, connection_verify=str(pki["ca"]))
    container = service.create_container("iothub-results")
    endpoint = StorageEndpoint(container_sink(container), iothub="fakehub", batch_frequency_s=60)
    hub.add_storage_route(endpoint, condition=lambda props: props.get("type") in ("result", "stats", "feedback"))
    keys = {STEADY: device_key, SHIFTED: base64.b64encode(os.urandom(32)).decode()}
    hub.add_device(SHIFTED, key=keys[SHIFTED])
    for dev, tags in TAGS.items():
        hub.set_tags(dev, tags)
    sent = {STEADY: steady_studies(tmp_path / "steady"), SHIFTED: shifted_studies(tmp_path / "shifted")}
    priv = {"central-1": central_keys["priv"]}
    config = "[pipeline]\nenabled = true\npoll_s = 0.2\n"

    def env_for(dev: str, home: Path) -> dict[str, str]:
        env = {
            k: v
            for k, v in cloud_env(home, hub.port, pki, keys[dev], central_keys["pub"], device_id=dev).items()
            if k.startswith("APPLIANCE_CLOUD__")
        }
        env.update(
            APPLIANCE_PIPELINE__ENABLED="true",
            APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES="true",
            APPLIANCE_ENGINES__BACKEND="ort",
            APPLIANCE_API__ENABLED="true",
        )
        return env

    with (
        running_daemon(tmp_path / "home-a", config_toml=config, env=env_for(STEADY, tmp_path / "home-a")) as da,
        running_daemon(tmp_path / "home-b", config_toml=config, env=env_for(SHIFTED, tmp_path / "home-b")) as db,
    ):
        daemons: dict[str, Daemon] = {STEADY: da, SHIFTED: db}
        for dev, d in daemons.items():
            out = storescu(d.port, [f for s in sent[dev] for f in s["files"]])
            assert out.stdout.count("Received Store Response (Success)") == len(sent[dev]), out.stdout[-3000:]
        for dev in daemons:
            wait_until(
                lambda dev=dev: len(hub.messages(dev, "result")) >= len(sent[dev]),
                timeout=240,
                interval=1.0,
                what=f"{len(sent[dev])} results of {dev} at the hub",
            )

        # -- feedback on one of the steady site's studies, through the dashboard (form post, logged-in session) --
        assert user_cli(da, "add", "rad", "--role", "viewer", "--password-stdin", stdin=f"{PASSWORD}\n").returncode == 0
        feedback_sid = min(s["id"] for s in da.studies())
        with client_for(da) as c:
            login = c.post("/api/v1/session", json={"username": "rad", "password": PASSWORD})
            assert login.status_code == 200, login.text
            token = login.json()["csrf_token"]
            r = c.post(
                f"/studies/{feedback_sid}/feedback",
                data={
                    "kind": "finding",
                    "bundle_id": "cxr-phantom",
                    "label": "nodule",
                    "verdict": "disagree",
                    "csrf_token": token,
                },
            )
            assert r.status_code in (200, 303), r.text
        fb_msgs = wait_until(lambda: hub.messages(STEADY, "feedback"), timeout=60, what="the feedback message")

        # -- a stats snapshot from each box ------------------------------------------------------------------------
        for dev in daemons:
            status, body = hub.invoke_method(dev, "send_stats", {})
            assert status == 200, body
            assert [q["bundle_id"] for q in body["queued"]] == ["cxr-phantom"], body
        for dev in daemons:
            wait_until(lambda dev=dev: hub.messages(dev, "stats"), timeout=60, what=f"stats of {dev}")
    endpoint.flush()
    endpoint.close()

    # -- what was sent, decrypted here: scores per site and label, the box's call on the study given feedback ----
    results: dict[str, dict[str, Any]] = {}
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    for dev in (STEADY, SHIFTED):
        msgs = hub.messages(dev, "result")
        assert len({m.props["$.mid"] for m in msgs}) == len(sent[dev])  # one result per study sent
        for m in msgs:
            doc = json.loads(crypto.decrypt(m.body, priv)[1])
            results[m.props["$.mid"]] = doc
            for f in doc["findings"]:
                scores[(TAGS[dev]["site"], f["label"])].append(f["score"])
    fb = json.loads(crypto.decrypt(fb_msgs[0].body, priv)[1])
    assert (fb["kind"], fb["label"], fb["verdict"]) == ("finding", "nodule", "disagree")
    judged = results[fb["result_mid"]]
    box_positive = any(f["positive"] for f in judged["findings"] if f["label"] == "nodule")

    # -- central ingest from the container ------------------------------------------------------------------------
    keydir = tmp_path / "keys"
    keydir.mkdir()
    (keydir / "central-1.key").write_text(central_keys["priv"])
    store = tmp_path / "store"
    env = daemon_env(
        {
            "APPLIANCE_CENTRAL_BLOB_CONNECTION_STRING": azurite.connection_string,
            "APPLIANCE_CENTRAL_BLOB_CA_FILE": str(pki["ca"]),
            "IOTHUB_CONNECTION_STRING": hub.service_connection_string(),
            "APPLIANCE_CENTRAL_CA_FILE": str(pki["ca"]),
        }
    )
    url = f"{azurite.blob_endpoint}/iothub-results"
    res = central(["ingest", "--from", url, "--to", str(store), "--key", str(keydir)], env)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    n_messages = len(results) + len(hub.messages(STEADY, "stats")) + len(hub.messages(SHIFTED, "stats")) + 1
    assert summary["accepted"] == n_messages, summary

    stats_table = f"read_parquet('{store_schema.table_glob(store, 'stats')}', hive_partitioning=true)"
    counted = duckdb.sql(  # one snapshot per box (today)
        f"SELECT site, sum(count) FROM {stats_table} WHERE metric = 'count:studies' GROUP BY site"
    ).fetchall()
    assert dict(counted) == {TAGS[d]["site"]: len(sent[d]) for d in (STEADY, SHIFTED)}
    makers = duckdb.sql(
        f"SELECT site, key, count FROM {stats_table} WHERE metric = 'inputs:manufacturer_model' ORDER BY site"
    ).fetchall()
    assert makers == [
        (TAGS[SHIFTED]["site"], "OtherVendor|DR-9000", N_SHIFTED),
        (TAGS[STEADY]["site"], "Phantom Imaging (synthetic)|unknown", N_STEADY),
    ]

    # -- the report on DuckDB --------------------------------------------------------------------------------------
    report_args = ["report", "--store", str(store), "--json", "--bundle", str(BUNDLE)]
    rep = central(report_args, env)
    assert rep.returncode == 0, rep.stderr
    report = json.loads(rep.stdout)
    with tarfile.open(BUNDLE) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    reference = manifest["reference"]["scores"]
    assert "drift" not in manifest  # the defaults (PSI_ALERT, MIN_STUDIES) apply
    assert manifest["reference"]["n"] == N_STEADY  # the steady site sent the whole validation set

    drift = {(r["site"], r["label"]): r for r in report["tables"]["drift"]["rows"]}
    assert len({r["week"] for r in report["tables"]["drift"]["rows"]}) == 1  # one week of data
    assert set(drift) == set(scores)
    for (site, label), values in scores.items():
        row = drift[(site, label)]
        counts = np.histogram(values, bins=EDGES)[0]
        others = [x for (s, lb), v in scores.items() if s != site and lb == label for x in v]
        assert row["n"] == len(values) >= MIN_STUDIES and row["reference_n"] == sum(reference[label])
        assert row["psi_reference"] == pytest.approx(psi(counts, reference[label]), abs=1e-9)
        assert row["fleet_n"] == len(others)
        assert row["psi_fleet"] == pytest.approx(psi(counts, np.histogram(others, bins=EDGES)[0]), abs=1e-9)
        _, p_fleet = ks_binned(np.histogram(others, bins=EDGES)[0], counts)
        assert row["p_fleet"] == pytest.approx(p_fleet, rel=1e-9, abs=1e-12)
        # two sites: each is the other's fleet; the box's rule, PSI and the KS test (default p_alert 0.01)
        assert row["alert_fleet"] == (row["psi_fleet"] >= PSI_ALERT and p_fleet < 0.01)
    shifted_site, steady_site = TAGS[SHIFTED]["site"], TAGS[STEADY]["site"]
    labels = sorted({lb for _, lb in scores})
    assert labels == ["cardiomegaly", "effusion", "nodule"]
    for label in labels:
        assert drift[(shifted_site, label)]["alert_reference"], drift[(shifted_site, label)]
        assert drift[(shifted_site, label)]["alert_fleet"], drift[(shifted_site, label)]
        assert drift[(shifted_site, label)]["psi_reference"] > 1.0
        assert not drift[(steady_site, label)]["alert_reference"], drift[(steady_site, label)]
        assert drift[(steady_site, label)]["psi_reference"] < 0.05  # reproduces its validation reference

    volume = {r["site"]: r["studies"] for r in report["tables"]["volume"]["rows"]}
    assert volume == {TAGS[d]["site"]: len(sent[d]) for d in (STEADY, SHIFTED)}
    concordance = report["tables"]["concordance"]["rows"]
    assert [(r["site"], r["label"]) for r in concordance] == [(steady_site, "nodule")]
    row = concordance[0]
    assert (row["agree"], row["disagree"], row["uncertain"]) == (0, 1, 0)
    assert row["agreement_rate"] == 0.0
    assert row["positives_judged"] == int(box_positive) and row["positives_agreed"] == 0
    assert row["ppv"] == (0.0 if box_positive else None)

    # -- the same report on Spark ----------------------------------------------------------------------------------
    if shutil.which("java") is None:
        pytest.fail("no Java runtime (Debian openjdk-17-jre-headless) for the Spark report")
    spark = central([*report_args, "--engine", "spark"], env, timeout=400)
    assert spark.returncode == 0, spark.stderr[-4000:]
    spark_report = json.loads(spark.stdout)
    assert spark_report["engine"] == "spark" and report["engine"] == "duckdb"
    assert_same_tables(report, spark_report)
