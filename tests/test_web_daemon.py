"""The dashboard inside the real daemon: HTTPS with the certificate made at first start, the user CLI, and the
acceptance flow in real headless Chromium (Debian's chromium + chromedriver through Selenium): log in, see the
phantom study with its overlay and finding, retry it, see the audit entry; ``/metrics`` parsed after the study.

Screenshots go to the test's tmp dir and to ``test-artifacts/`` (kept by CI, ignored by git).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engines.reference.phantoms import chest_study
from testsupport.common import PYTHON, ROOT, wait_until
from testsupport.daemon import Daemon, running_daemon
from testsupport.dcmtk import have_dcmtk, storescu
from testsupport.orthanc import AET, Orthanc

pytestmark = pytest.mark.integration

PASSWORD = "phantom-technician-1"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = ROOT / "test-artifacts"
WEB_ON = {"APPLIANCE_API__ENABLED": "true"}


def user_cli(d: Daemon, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``appliance --home H user ARGS`` with the daemon's environment."""
    return subprocess.run(
        [PYTHON, "-m", "appliance", "--home", str(d.home), "user", *args],
        cwd=ROOT,
        env={**d.env, "COLUMNS": "200"},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def client_for(d: Daemon) -> httpx.Client:
    """An HTTPS client that trusts exactly the daemon's self-signed certificate."""
    ctx = ssl.create_default_context(cafile=str(d.home / "secrets" / "web" / "cert.pem"))
    return httpx.Client(base_url=d.web_url, verify=ctx, timeout=30)


def test_https_with_a_certificate_made_once_and_the_user_cli(home: Path) -> None:
    with running_daemon(home, env=WEB_ON) as d:
        web = d.status_doc["services"]["web"]
        assert web["port"] > 0 and web["self_signed"] is True
        key = home / "secrets" / "web" / "key.pem"
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
        first = web["certificate_sha256"]
        with client_for(d) as c:  # certificate verified against the file: TLS is real, the SAN has 127.0.0.1
            assert c.get("/healthz").text == "ok\n"
            assert c.get("/readyz").json() == {"ready": True, "reasons": []}  # pipeline off: listener + database
            assert c.get("/api/v1/studies").status_code == 401
            assert c.get("/api/v1/openapi.json").json()["info"]["title"] == "Clinic appliance API"
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served (the TLS server drops it)
            httpx.get(d.web_url.replace("https:", "http:") + "/healthz", timeout=10)

        r = user_cli(d, "add", "tech", "--role", "technician", "--password-stdin", stdin=f"{PASSWORD}\n")
        assert r.returncode == 0, r.stderr
        assert user_cli(d, "add", "tech", "--role", "viewer", "--password-stdin", stdin=f"{PASSWORD}\n").returncode == 1
        weak = user_cli(d, "add", "weak", "--role", "viewer", "--password-stdin", stdin="short\n")
        assert weak.returncode == 1 and "too short" in weak.stderr
        bad_role = user_cli(d, "add", "x", "--role", "root", "--password-stdin", stdin=f"{PASSWORD}\n")
        assert bad_role.returncode == 1 and "unknown role" in bad_role.stderr
        with client_for(d) as c:  # the running daemon sees the user at once
            assert c.post("/api/v1/session", json={"username": "tech", "password": PASSWORD}).status_code == 200
        listed = user_cli(d, "list", "--json")
        assert [(u["name"], u["role"]) for u in json.loads(listed.stdout)] == [("tech", "technician")]
        assert user_cli(d, "passwd", "tech", "--password-stdin", stdin="another-password-2\n").returncode == 0
        assert user_cli(d, "disable", "tech").returncode == 0
        with client_for(d) as c:
            r = c.post("/api/v1/session", json={"username": "tech", "password": "another-password-2"})
            assert r.status_code == 401
        assert user_cli(d, "remove", "tech").returncode == 0
        assert user_cli(d, "remove", "tech").returncode == 1
        trail = d.query("SELECT event, actor, subject FROM audit_log WHERE event LIKE 'user_%' ORDER BY seq")
        assert [(r["event"], r["subject"]) for r in trail] == [
            ("user_added", "tech"),
            ("user_changed", "tech"),
            ("user_changed", "tech"),
            ("user_changed", "tech"),
        ]
        assert all(r["actor"].startswith("cli:") for r in trail)
    with running_daemon(home, env=WEB_ON) as d:  # the same certificate on the next start
        assert d.status_doc["services"]["web"]["certificate_sha256"] == first


# -- the acceptance flow in Chromium -------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--ignore-certificate-errors",  # the box's self-signed certificate (a technician accepts it once)
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def _metrics(d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with client_for(d) as c:
        text = c.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_a_technician_logs_in_sees_the_phantom_finding_retries_it_and_sees_the_audit_entry(
    home: Path, tmp_path: Path, orthanc: Orthanc, browser: object
) -> None:
    if not have_dcmtk():
        pytest.skip("dcmtk is not installed")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    shots = tmp_path / "screenshots"
    shots.mkdir()

    def shot(name: str) -> None:
        driver.save_screenshot(str(shots / f"{name}.png"))  # type: ignore[attr-defined]

    study = chest_study(tmp_path / "in", seed=7, nodules=1)
    config = (
        '[engines]\nbackend = "ort"\n'
        "[pipeline]\nenabled = true\npoll_s = 0.2\nretry_initial_s = 0.5\n"
        f'[[pipeline.destinations]]\nname = "pacs"\nae_title = "{AET}"\nhost = "127.0.0.1"\n'
        f"port = {orthanc.dicom_port}\n"
    )
    env = {**WEB_ON, "APPLIANCE_PIPELINE__ENABLED": "true", "APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES": "true"}
    try:
        with running_daemon(home, config_toml=config, env=env, timeout=180) as d:
            added = user_cli(d, "add", "tech", "--role", "technician", "--password-stdin", stdin=f"{PASSWORD}\n")
            assert added.returncode == 0, added.stderr
            with client_for(d) as c:
                wait_until(lambda: c.get("/readyz").status_code == 200, timeout=180, interval=0.5, what="ready")
            sent = storescu(d.port, study["files"])
            assert "Received Store Response (Success)" in sent.stdout, sent.stdout
            wait_until(lambda: d.studies("exported"), timeout=180, interval=0.5, what="study exported")
            sid = d.studies("exported")[0]["id"]

            m = _metrics(d)
            assert m[("appliance_studies_received_total", ())] == 1
            assert m[("appliance_studies_processed_total", ())] == 1
            assert m[("appliance_studies_failed_total", ())] == 0
            assert m[("appliance_studies_no_model_total", ())] == 0
            assert m[("appliance_studies", (("state", "exported"),))] == 1
            assert m[("appliance_inference_seconds_count", (("bundle_id", "cxr-phantom"),))] == 1
            assert ("appliance_inference_seconds_count", (("bundle_id", "mmg-phantom"),)) not in m
            assert m[("appliance_export_backlog", ())] == 0
            assert m[("appliance_models_loaded", ())] == 2
            assert m[("appliance_cloud_enabled", ())] == 0 and m[("appliance_cloud_connected", ())] == 0
            assert m[("appliance_queue_depth", (("queue", "analysis"),))] == 0
            assert m[("appliance_disk_free_bytes", ())] > 0

            wait = WebDriverWait(driver, 60)
            driver.get(d.web_url + "/")  # type: ignore[attr-defined]
            wait.until(lambda drv: drv.find_elements(By.ID, "login-form"))
            shot("01-login")
            driver.find_element(By.ID, "username").send_keys("tech")  # type: ignore[attr-defined]
            driver.find_element(By.ID, "password").send_keys(PASSWORD)  # type: ignore[attr-defined]
            driver.find_element(By.ID, "login-submit").click()  # type: ignore[attr-defined]
            wait.until(lambda drv: drv.find_elements(By.ID, "whoami"))
            assert "tech (technician)" in driver.find_element(By.ID, "whoami").text  # type: ignore[attr-defined]
            shot("02-dashboard")

            driver.get(d.web_url + "/worklist")  # type: ignore[attr-defined]
            row = wait.until(lambda drv: drv.find_element(By.CSS_SELECTOR, f'tr[data-study-id="{sid}"]'))
            assert "PHANTOM" in row.text and "ACC000007" in row.text and "nodule" in row.text
            shot("03-worklist")
            row.find_element(By.TAG_NAME, "a").click()
            wait.until(lambda drv: drv.find_elements(By.ID, "findings"))
            findings = driver.find_element(By.ID, "findings").text  # type: ignore[attr-defined]
            assert "cxr-phantom" in findings and "nodule" in findings and "positive" in findings
            img = driver.find_element(By.CSS_SELECTOR, "img.overlay")  # type: ignore[attr-defined]
            wait.until(lambda drv: drv.execute_script("return arguments[0].complete", img))
            width = driver.execute_script("return arguments[0].naturalWidth", img)  # type: ignore[attr-defined]
            assert width > 100  # the SC overlay decoded as an image in the browser
            shot("04-study")

            driver.find_element(By.ID, "retry").click()  # type: ignore[attr-defined]
            msg = wait.until(lambda drv: drv.find_element(By.ID, "message"))
            assert "Analysis requested again" in msg.text
            shot("05-retried")
            wait_until(
                lambda: _metrics(d)[("appliance_inference_seconds_count", (("bundle_id", "cxr-phantom"),))] == 2,
                timeout=180,
                interval=0.5,
                what="study analysed again",
            )

            driver.get(d.web_url + "/audit?event=study_retry")  # type: ignore[attr-defined]
            entries = wait.until(lambda drv: drv.find_elements(By.CSS_SELECTOR, 'tr[data-event="study_retry"]'))
            assert len(entries) == 1 and "tech" in entries[0].text
            shot("06-audit")
            events = [r["event"] for r in d.query("SELECT event FROM audit_log ORDER BY seq")]
            assert {"user_added", "login", "study_viewed", "study_retry"} <= set(events)
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        for f in shots.glob("*.png"):
            shutil.copy2(f, ARTIFACTS / f"web-{f.name}")
