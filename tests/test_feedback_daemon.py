"""Radiologists' feedback and site operating points on the real daemon, end to end.

storescu -> daemon (a cxr-phantom re-issued with a ``threshold_range``, signed with the DEMO key) -> Orthanc and
the fake IoT Hub over TLS. A viewer gives feedback on the study page in real headless Chromium (axe-core run on
the page); the feedback row and its audit entry are stored, the de-identified ``feedback`` message reaches the
hub, decrypts, and no identifying value of the study is anywhere in the hub's traffic. Then the central team's
operating point (``appliance central operating-point sign``, a test central key the box trusts) goes through the
twin; the study analysed again and a new study are judged by it: positive exactly when their SR score is at or
above the site threshold. An out-of-range and a badly signed operating point are refused, reported with the
reason, and the one in force stays."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from appliance.cloud import crypto
from engines import bundle as B
from engines import keys
from engines.reference.phantoms import PatientInfo, chest_study
from tests.test_web_daemon import CHROMEDRIVER, CHROMIUM, client_for, user_cli
from testsupport.bundles import demo_private_key
from testsupport.cloud import DEVICE, cloud_env
from testsupport.common import PYTHON, ROOT, wait_until
from testsupport.daemon import Daemon, running_daemon
from testsupport.dcmtk import have_dcmtk, storescu
from testsupport.fakehub import FakeHub
from testsupport.orthanc import AET, Orthanc

pytestmark = pytest.mark.integration

PASSWORD = "phantom-radiologist-1"
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
NODULE_RANGE = (0.1, 0.95)
PATIENT = PatientInfo(
    name="FEEDBACK^GRACE^M",
    patient_id="PID-FB-5150",
    birth_date="19700214",
    accession="ACC-FB-2718",
    institution="Riverbend Rural Clinic",
)


def reissued_cxr_phantom(out: Path) -> Path:
    """The shipped cxr-phantom with ``threshold_range`` on its scores output (as the central team re-issues a
    bundle), version 1.0.2, signed with the DEMO key the test daemon trusts."""
    src = ROOT / "tests" / "data" / "legacy-bundles" / "cxr-phantom-1.0.1.bundle"
    work = out / "cxr-src"
    work.mkdir(parents=True)
    with tarfile.open(src) as tar:
        for name in ("manifest.json", "model.onnx", "golden.npz"):
            (work / name).write_bytes(tar.extractfile(name).read())  # type: ignore[union-attr]
    doc = json.loads((work / "manifest.json").read_text())
    for o in doc["outputs"]:
        if o["kind"] == "scores":
            o["threshold_range"] = {"nodule": list(NODULE_RANGE)}
    doc["version"] = "1.0.2"
    for k in ("files", "file_sizes"):
        doc.pop(k, None)
    bundle = out / "cxr-phantom-1.0.2.bundle"
    B.build_bundle(bundle, doc, {"model.onnx": work / "model.onnx", "golden.npz": work / "golden.npz"})
    B.sign_bundle(bundle, demo_private_key())
    return bundle


def sr_findings(path: Path) -> dict[str, tuple[float, bool]]:
    """label -> (score, above threshold) read from a TID 1500 SR: each measurement group's Tracking Identifier
    ("<label> score"), its NUM value and its "Score at or above operating point" Yes/No (PS3.16 TID 1501)."""
    out: dict[str, tuple[float, bool]] = {}

    def walk(items: Any) -> None:
        for it in items or []:
            children = list(it.get("ContentSequence", []))
            ident = next(
                (
                    c.TextValue
                    for c in children
                    if c.ValueType == "TEXT" and c.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"
                ),
                None,
            )
            num = next((c for c in children if c.ValueType == "NUM"), None)
            above = next(
                (
                    c
                    for c in children
                    if c.ValueType == "CODE"
                    and c.ConceptNameCodeSequence[0].CodeMeaning == "Score at or above operating point"
                ),
                None,
            )
            if ident and ident.endswith(" score") and num is not None and above is not None:
                value = float(num.MeasuredValueSequence[0].NumericValue)
                out[ident.removesuffix(" score")] = (value, above.ConceptCodeSequence[0].CodeMeaning == "Yes")
            walk(children)

    walk(dcmread(path).ContentSequence)
    return out


def newest_sr(d: Daemon, study_id: int) -> Path:
    rows = d.query(
        "SELECT o.path FROM result_objects o JOIN results r ON r.id=o.result_id WHERE r.study_id=? AND o.kind='SR'"
        " ORDER BY r.id DESC, o.id DESC LIMIT 1",
        (study_id,),
    )
    return d.home / rows[0]["path"]


def central(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "appliance", "central", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_feedback_in_chromium_and_a_site_operating_point_through_the_twin(
    home: Path, tmp_path: Path, orthanc: Orthanc, hub: FakeHub, pki, device_key, central_keys
) -> None:
    if not have_dcmtk():
        pytest.skip("dcmtk is not installed")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    if not AXE.exists():
        pytest.skip("axe-core is not installed (npm install, package.json)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    signing = keys.generate_private_key()  # the central team's signing key (key sets and operating points)
    keys.write_private_key(signing, tmp_path / "central.pem")
    stranger = keys.generate_private_key()
    keys.write_private_key(stranger, tmp_path / "stranger.pem")
    bundle = reissued_cxr_phantom(tmp_path)
    env = {
        k: v
        for k, v in cloud_env(
            home,
            hub.port,
            pki,
            device_key,
            central_keys["pub"],
            keyset_trusted_keys={keys.key_id(signing): keys.public_key_b64(signing)},
        ).items()
        if k.startswith("APPLIANCE_CLOUD__")
    }
    env.update(
        APPLIANCE_PIPELINE__ENABLED="true",
        APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES="false",
        APPLIANCE_ENGINES__BACKEND="ort",
        APPLIANCE_API__ENABLED="true",
    )
    config = (
        "[pipeline]\nenabled = true\npoll_s = 0.2\nretry_initial_s = 0.5\n"
        f'[[pipeline.destinations]]\nname = "pacs"\nae_title = "{AET}"\nhost = "127.0.0.1"\n'
        f"port = {orthanc.dicom_port}\n"
    )
    first = chest_study(tmp_path / "a", seed=21, nodules=1, patient=PATIENT)
    second = chest_study(tmp_path / "b", seed=22, nodules=1, patient=PATIENT)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--ignore-certificate-errors"):
        options.add_argument(arg)
    options.add_argument("--window-size=1024,768")  # a tablet in landscape
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = None
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        with running_daemon(home, config_toml=config, env=env, timeout=180) as d:
            installed = subprocess.run(
                [PYTHON, "-m", "appliance", "--home", str(home), "model", "install", str(bundle)],
                cwd=ROOT,
                env=d.env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert installed.returncode == 0, installed.stderr
            assert (
                user_cli(d, "add", "rad", "--role", "viewer", "--password-stdin", stdin=f"{PASSWORD}\n").returncode == 0
            )
            sent = storescu(d.port, first["files"])
            assert "Received Store Response (Success)" in sent.stdout, sent.stdout
            wait_until(lambda: d.studies("exported"), timeout=180, interval=0.5, what="study exported")
            sid = d.studies("exported")[0]["id"]
            result_msg = wait_until(lambda: hub.messages(DEVICE, "result"), timeout=60, what="result message")[0]
            priv = {"central-1": central_keys["priv"]}
            result_doc = json.loads(crypto.decrypt(result_msg.body, priv)[1])
            score_a, positive_a = sr_findings(newest_sr(d, sid))["nodule"]
            assert positive_a and score_a >= 0.204, "the phantom's nodule is found at the manifest's threshold"
            nodule = next(f for f in result_doc["findings"] if f["label"] == "nodule")
            assert (nodule["threshold"], nodule["threshold_source"]) == (0.204, "manifest")
            assert result_doc["operating_point_version"] is None

            # -- feedback in Chromium, as a viewer (a radiologist on a tablet) --------------------------------------
            driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
            from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

            # the page reloads after each form (POST/redirect/GET): an element may go stale while it is read
            wait = WebDriverWait(
                driver, 60, ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)
            )

            def message_has(text: str) -> None:
                wait.until(lambda drv: text in drv.find_element(By.ID, "message").text)

            driver.get(d.web_url + "/login")
            wait.until(lambda drv: drv.find_elements(By.ID, "login-form"))
            driver.find_element(By.ID, "username").send_keys("rad")
            driver.find_element(By.ID, "password").send_keys(PASSWORD)
            driver.find_element(By.ID, "login-submit").click()
            wait.until(lambda drv: drv.find_elements(By.ID, "whoami"))
            driver.get(f"{d.web_url}/studies/{sid}")
            wait.until(lambda drv: drv.find_elements(By.ID, "feedback-findings"))
            driver.execute_script(AXE.read_text())
            axe = driver.execute_async_script(
                "const done = arguments[arguments.length - 1];"
                "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations));"
            )
            bad = [(v["id"], v["impact"]) for v in axe if v["impact"] in ("critical", "serious")]
            assert bad == [], bad
            button = driver.find_element(By.ID, "verdict-nodule-disagree")
            assert button.size["height"] >= 44 and button.size["width"] >= 44  # a finger, not a mouse
            button.click()
            message_has("Feedback recorded and sent to the central team.")  # a fixed message key, not URL text

            def verdict_has(text: str) -> None:
                cell = 'tr[data-label="nodule"] td.verdict'
                wait.until(lambda drv: text in drv.find_element(By.CSS_SELECTOR, cell).text)

            verdict_has("disagree")
            driver.find_element(By.ID, "verdict-nodule-agree").click()  # changed their mind: revision 2
            verdict_has("revision 2")
            from selenium.webdriver.support.ui import Select

            Select(driver.find_element(By.ID, "outcome_code")).select_by_value("biopsy_malignant")
            driver.find_element(By.ID, "outcome-submit").click()
            wait.until(lambda drv: "Biopsy: malignant" in drv.find_element(By.ID, "outcome-in-force").text)
            verdict = driver.find_element(By.CSS_SELECTOR, 'tr[data-label="nodule"] td.verdict').text
            assert "agree" in verdict and "rad (viewer)" in verdict and "revision 2" in verdict
            driver.save_screenshot(str(shots / "feedback.png"))

            rows = d.query("SELECT kind, label, verdict, outcome_code, revision, actor, role FROM feedback ORDER BY id")
            assert [tuple(r) for r in rows] == [
                ("finding", "nodule", "disagree", None, 1, "rad", "viewer"),
                ("finding", "nodule", "agree", None, 2, "rad", "viewer"),
                ("outcome", "", None, "biopsy_malignant", 1, "rad", "viewer"),
            ]
            trail = d.query("SELECT actor, subject, detail FROM audit_log WHERE event='feedback' ORDER BY seq")
            assert [json.loads(r["detail"])["revision"] for r in trail] == [1, 2, 1]
            assert {r["actor"] for r in trail} == {"rad"} and {r["subject"] for r in trail} == {result_doc["study_uid"]}
            fbs = wait_until(
                lambda: len(hub.messages(DEVICE, "feedback")) == 3 and hub.messages(DEVICE, "feedback"),
                timeout=60,
                what="three feedback messages",
            )
            docs = []
            for m in fbs:
                meta, plain = crypto.decrypt(m.body, priv)
                assert (
                    meta["type"] == "feedback" and meta["schema"] == "feedback/v1" and meta["mid"] == m.props["$.mid"]
                )
                docs.append(json.loads(plain))
            assert [(x["kind"], x["label"], x["verdict"], x["outcome"]) for x in docs] == [
                ("finding", "nodule", "disagree", None),
                ("finding", "nodule", "agree", None),
                ("outcome", None, None, {"code": "biopsy_malignant", "positive": True}),
            ]
            assert {x["result_mid"] for x in docs} == {result_msg.props["$.mid"]}
            assert {x["study"] for x in docs} == {result_doc["study_uid"]}
            assert {(x["bundle_id"], x["bundle_version"], x["role"]) for x in docs} == {
                ("cxr-phantom", "1.0.2", "viewer")
            }
            assert len({m.props["$.mid"] for m in fbs}) == 3  # a changed verdict is a new message

            # -- the study CLI shows it ------------------------------------------------------------------------------
            shown = subprocess.run(
                [PYTHON, "-m", "appliance", "--home", str(home), "study", "show", str(sid), "--json"],
                cwd=ROOT,
                env=d.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            fb = json.loads(shown.stdout)["feedback"]
            assert [(e["verdict"], e["in_force"]) for e in fb] == [("disagree", False), ("agree", True), (None, True)]

            # -- a site operating point from the central team, through the twin --------------------------------------
            site_t = round((score_a + NODULE_RANGE[1]) / 2, 4)  # above this study's SR score, within the range
            assert score_a < site_t <= NODULE_RANGE[1], (score_a, site_t)
            signed = central(
                "operating-point",
                "sign",
                "--key",
                str(tmp_path / "central.pem"),
                "--bundle",
                "cxr-phantom",
                "--site",
                "riverbend",
                "--threshold",
                f"nodule={site_t}",
                "--version",
                "3",
            )
            assert signed.returncode == 0, signed.stderr
            patch = json.loads(signed.stdout)["properties"]["desired"]
            v_ok = hub.update_desired(DEVICE, patch)
            wait_until(
                lambda: (hub.twin(DEVICE)["reported"].get("desired_status") or {}).get("version") == v_ok,
                timeout=30,
                what="operating point applied",
            )
            assert hub.twin(DEVICE)["reported"]["desired_status"]["status"] == "applied"
            assert hub.twin(DEVICE)["reported"]["operating_points"]["cxr-phantom"] == {
                "version": 3,
                "site": "riverbend",
                "thresholds": {"nodule": site_t},
            }

            # refused: out of the manifest's range, signed by a key the box does not trust, older than in force
            for key, thr, version, reason in (
                ("central.pem", NODULE_RANGE[1] + 0.01, 4, "outside the range"),
                ("stranger.pem", 0.3, 5, "unknown_signer"),
                ("central.pem", 0.3, 2, "replayed"),
            ):
                bad = central(
                    "operating-point",
                    "sign",
                    "--key",
                    str(tmp_path / key),
                    "--bundle",
                    "cxr-phantom",
                    "--site",
                    "riverbend",
                    "--threshold",
                    f"nodule={thr}",
                    "--version",
                    str(version),
                )
                assert bad.returncode == 0, bad.stderr
                v_bad = hub.update_desired(DEVICE, json.loads(bad.stdout)["properties"]["desired"])
                status = wait_until(
                    lambda v=v_bad: (
                        (s := hub.twin(DEVICE)["reported"].get("desired_status") or {}).get("version") == v and s
                    ),
                    timeout=30,
                    what=f"refusal {reason}",
                )
                # the rest of the document applies; the operating point alone is refused, with its reason
                assert status["status"] == "applied", status
                refused = wait_until(
                    lambda: hub.twin(DEVICE)["reported"].get("operating_points_refused"), timeout=30, what="refused"
                )
                assert [r["bundle"] for r in refused] == ["cxr-phantom"] and reason in refused[0]["reason"], refused
                assert hub.twin(DEVICE)["reported"]["operating_points"]["cxr-phantom"]["version"] == 3

            # the same study analysed again, and a new study: judged by the site threshold
            with client_for(d) as c:
                tech = user_cli(d, "add", "tech", "--role", "technician", "--password-stdin", stdin=f"{PASSWORD}\n")
                assert tech.returncode == 0
                token = c.post("/api/v1/session", json={"username": "tech", "password": PASSWORD}).json()["csrf_token"]
                assert c.post(f"/api/v1/studies/{sid}/retry", headers={"X-CSRF-Token": token}).status_code == 200
                models = c.get("/api/v1/models").json()
                assert models["operating_points"]["cxr-phantom"]["thresholds"] == {"nodule": site_t}
                page = c.get("/technician").text
                assert "riverbend" in page and f"nodule = {site_t}" in page
            sent = storescu(d.port, second["files"])
            assert "Received Store Response (Success)" in sent.stdout, sent.stdout
            try:
                wait_until(lambda: len(hub.messages(DEVICE, "result")) >= 3, timeout=180, interval=0.5, what="results")
            except AssertionError as exc:
                states = [(r["id"], r["state"], r["detail"]) for r in d.studies()]
                raise AssertionError(
                    f"{exc}; studies {states}; results {len(hub.messages(DEVICE, 'result'))}; log: {d.logs()[-6000:]}"
                ) from exc
            wait_until(lambda: len(d.studies("exported")) == 2, timeout=180, interval=0.5, what="both exported")
            for study_id in (r["id"] for r in d.studies("exported")):
                score, above = sr_findings(newest_sr(d, study_id))["nodule"]
                assert above == (score >= site_t), (study_id, score, site_t)
            score_again, above_again = sr_findings(newest_sr(d, sid))["nodule"]
            assert abs(score_again - score_a) < 1e-6 and not above_again  # the same score, now below the site's
            docs2 = [json.loads(crypto.decrypt(m.body, priv)[1]) for m in hub.messages(DEVICE, "result")[1:]]
            for doc in docs2:
                f = next(f for f in doc["findings"] if f["label"] == "nodule")
                assert (f["threshold"], f["threshold_source"], doc["operating_point_version"]) == (site_t, "site", 3)
                assert f["positive"] == (f["score"] >= site_t)
            listed = subprocess.run(
                [PYTHON, "-m", "appliance", "--home", str(home), "model", "list"],
                cwd=ROOT,
                env=d.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert f"site operating point v3 (riverbend): nodule={site_t:g}" in listed.stdout, listed.stdout
    finally:
        if driver is not None:
            driver.quit()
        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        for f in shots.glob("*.png"):
            shutil.copy2(f, artifacts / f"feedback-{f.name}")

    # nothing identifying in anything the hub captured: bodies, properties, the twin
    captured = b"".join(m.body + json.dumps(m.props).encode() for m in hub.messages())
    captured += json.dumps(hub.twin(DEVICE)).encode()
    plain = b"".join(crypto.decrypt(m.body, priv)[1] for m in hub.messages(DEVICE, "feedback"))
    identifying = [
        PATIENT.name,
        PATIENT.name.replace("^", " "),
        PATIENT.patient_id,
        PATIENT.birth_date,
        PATIENT.accession,
        PATIENT.institution,
        first["study_uid"],
        second["study_uid"],
        *(str(dcmread(f).SOPInstanceUID) for s in (first, second) for f in s["files"]),
        *(str(dcmread(f).SeriesInstanceUID) for s in (first, second) for f in s["files"]),
        *(str(dcmread(f).StudyDate) for s in (first, second) for f in s["files"]),
    ]
    for value in identifying:
        assert value.encode() not in captured and value.encode() not in plain, value
