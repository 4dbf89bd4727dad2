"""The dashboard on a tablet, in real headless Chromium against the real daemon (issue 19's browser acceptance).

storescu sends a 4-view screening mammogram (the reference mmg-phantom bundle analyses it on ONNX Runtime; the
results go to Orthanc). At 1366, 1024 and 768 px CSS viewport width, an admin (who sees every page) logs in, opens
the dashboard, worklist, the MG study, the technician, audit and users pages and an error page; on each:
no horizontal page overflow (``scrollWidth <= innerWidth``), axe-core with 0 critical and 0 serious violations,
touch targets at least 44 px, and the studies tables' Findings column inside its scroll box. On the study page the
viewer opens an overlay full size, zooms (button, key), pans (key), shows the original image the box received and
the overlay again, fits and closes with the keyboard. The dashboard's PROBLEMS are exactly those
``appliance status --json`` lists. Screenshots land in ``test-artifacts/dashboard-tablet/`` (gitignored).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engines.reference.phantoms import PatientInfo, mammo_study
from tests.test_web_daemon import CHROMEDRIVER, CHROMIUM, user_cli
from testsupport.common import PYTHON, ROOT, wait_until
from testsupport.daemon import reference_pipeline_to_pacs, running_daemon
from testsupport.dcmtk import have_dcmtk, storescu
from testsupport.orthanc import AET, Orthanc

pytestmark = pytest.mark.integration

PASSWORD = "tablet-admin-passphrase-7"
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = ROOT / "test-artifacts" / "dashboard-tablet"
WIDTHS = (1366, 1024, 768)
HEIGHT = {1366: 768, 1024: 768, 768: 1024}  # landscape laptop, landscape and portrait tablet
PATIENT = PatientInfo(
    name="TABLET^MARIA",
    patient_id="PID-TAB-19",
    birth_date="19680310",
    accession="ACC-TAB-19",
    institution="Riverbend Rural Clinic",
)
# every control a finger must hit (inline text links in paragraphs are exempt, WCAG 2.5.5)
TARGETS = (
    "button, select, input:not([type=hidden]):not([type=checkbox]), header a, a.button, table.studies a,"
    " .table-scroll[tabindex]"
)


def _viewport(driver: Any, width: int) -> None:
    """Exactly ``width`` CSS px wide (device metrics, not the window: no scrollbar or frame guesswork)."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": HEIGHT[width], "deviceScaleFactor": 1, "mobile": False},
    )


def _check_page(driver: Any, name: str, width: int) -> None:
    """No horizontal page overflow, axe-core clean (critical/serious), touch targets >= 44 px, a screenshot."""
    driver.save_screenshot(str(ARTIFACTS / f"{width}-{name}.png"))
    inner, scroll = driver.execute_script("return [window.innerWidth, document.documentElement.scrollWidth]")
    assert inner == width, (name, inner)
    assert scroll <= inner, f"{name} at {width} px: the page is {scroll} px wide"
    driver.execute_script(AXE.read_text())
    violations = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations));"
    )
    bad = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3]) for v in violations]
    bad = [b for b in bad if b[1] in ("critical", "serious")]
    assert bad == [], f"{name} at {width} px: {bad}"
    small = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])]"
        ".filter(e => e.offsetParent !== null || e.closest('dialog[open]'))"
        ".map(e => [e.id || e.textContent.trim().slice(0, 30) || e.tagName, e.getBoundingClientRect()])"
        ".filter(([n, r]) => r.width > 0 && (r.height < 44 || r.width < 44))"
        ".map(([n, r]) => `${n}: ${Math.round(r.width)}x${Math.round(r.height)}`)",
        TARGETS,
    )
    assert small == [], f"{name} at {width} px: touch targets under 44 px: {small}"
    # a wide studies table scrolls in its own box and keeps the Findings column in view
    outside = driver.execute_script(
        "return [...document.querySelectorAll('.studies-scroll')].filter(box => {"
        " const b = box.getBoundingClientRect(), th = box.querySelector('th:last-child').getBoundingClientRect();"
        " return th.left < b.left - 1 || th.right > b.right + 1; }).length"
    )
    assert outside == 0, f"{name} at {width} px: a Findings column is outside its table's box"


def _loaded(driver: Any, img: Any) -> bool:
    """The image element has finished loading a decodable image."""
    return bool(driver.execute_script("const i = arguments[0]; return i.complete && i.naturalWidth > 0", img))


def test_every_page_at_tablet_widths_and_the_image_viewer(home: Path, orthanc: Orthanc) -> None:
    if not have_dcmtk():
        pytest.skip("dcmtk is not installed")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    if not AXE.exists():
        pytest.skip("axe-core is not installed (npm install, package.json)")
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    study = mammo_study(home.parent / "mg", seed=19, masses={"L": 1}, patient=PATIENT)
    config, env = reference_pipeline_to_pacs(orthanc.dicom_port, AET)
    env["APPLIANCE_API__ENABLED"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--ignore-certificate-errors",  # the box's self-signed certificate
        "--hide-scrollbars",
        "--window-size=1366,1024",
        f"--user-data-dir={home.parent / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    with running_daemon(home, config_toml=config, env=env, timeout=180) as d:
        added = user_cli(d, "add", "lead", "--role", "admin", "--password-stdin", stdin=f"{PASSWORD}\n")
        assert added.returncode == 0, added.stderr
        sent = storescu(d.port, study["files"])
        assert "Received Store Response (Success)" in sent.stdout, sent.stdout
        wait_until(lambda: d.studies("exported"), timeout=240, interval=0.5, what="MG study exported")
        sid = d.studies("exported")[0]["id"]
        status = subprocess.run(
            [PYTHON, "-m", "appliance", "--home", str(home), "--config", str(home.parent / f"{home.name}.toml")]
            + ["status", "--json"],  # the daemon's own config file (testsupport.daemon.start_daemon)
            cwd=ROOT,
            env=d.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert status.returncode == 0, status.stderr
        status_keys = sorted(p["key"] for p in json.loads(status.stdout)["problems"])

        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        driver.set_page_load_timeout(120)
        wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException, NoSuchElementException))
        try:
            for width in WIDTHS:
                _viewport(driver, width)
                driver.get(d.web_url + "/login")
                wait.until(lambda drv: drv.find_elements(By.ID, "login-form"))
                _check_page(driver, "login", width)
            driver.find_element(By.ID, "username").send_keys("lead")
            driver.find_element(By.ID, "password").send_keys(PASSWORD)
            driver.find_element(By.ID, "login-submit").click()
            wait.until(lambda drv: drv.find_elements(By.ID, "whoami"))

            for width in WIDTHS:
                _viewport(driver, width)
                driver.get(d.web_url + "/")
                wait.until(lambda drv: drv.find_elements(By.ID, "readiness"))
                assert f"/studies/{sid}" in driver.page_source
                shown = sorted(
                    e.get_attribute("data-key") for e in driver.find_elements(By.CSS_SELECTOR, "#problems li")
                )
                assert shown == status_keys, "the dashboard lists exactly the PROBLEMS `appliance status` lists"
                _check_page(driver, "dashboard", width)
                for path, marker, name in (
                    ("/worklist", "table.studies", "worklist"),
                    ("/technician", "table#models", "technician"),
                    ("/audit", "table#audit", "audit"),
                    ("/users", "table#users", "users"),
                ):
                    driver.get(d.web_url + path)
                    wait.until(lambda drv, m=marker: drv.find_elements(By.CSS_SELECTOR, m))
                    _check_page(driver, name, width)
                driver.get(f"{d.web_url}/studies/999999")  # an unknown study: the HTML error page, with navigation
                wait.until(lambda drv: drv.find_elements(By.ID, "error-detail"))
                assert driver.find_elements(By.ID, "whoami")
                _check_page(driver, "error-404", width)

                driver.get(f"{d.web_url}/studies/{sid}")
                wait.until(lambda drv: drv.find_elements(By.ID, "study-summary"))
                assert "MG" in driver.find_element(By.ID, "study-summary").text
                # the phantom's one mass is in the left breast: the finding is read per breast, with its views
                findings = driver.find_element(By.ID, "findings").text
                assert re.search(r"L breast: mass \d\.\d\d \((CC, MLO|CC|MLO)\)", findings), findings
                thumbs = driver.find_elements(By.CSS_SELECTOR, "button.open-viewer")
                assert len(thumbs) == 4, "one overlay per mammography view"
                alts = sorted(t.find_element(By.TAG_NAME, "img").get_attribute("alt") for t in thumbs)
                assert alts == [f"{s} {v} with AI overlay" for s in "LR" for v in ("CC", "MLO")], alts
                _check_page(driver, "study", width)

                # -- the viewer ------------------------------------------------------------------------------------
                first = thumbs[0]
                view_name = first.get_attribute("data-name")
                first.click()
                wait.until(lambda drv: drv.find_element(By.ID, "viewer").get_attribute("open") is not None)
                img = driver.find_element(By.ID, "viewer-img")
                wait.until(lambda drv, i=img: _loaded(drv, i))
                assert img.get_attribute("alt") == f"{view_name} with AI overlay"
                overlay_src = img.get_attribute("src")
                assert "/overlays/" in overlay_src
                box = driver.execute_script(
                    "const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]", img
                )
                assert box[0] <= width and box[0] > 0.5 * width, "full size: the image fills the viewer's width"

                def scale() -> float:
                    return float(driver.find_element(By.ID, "viewer").get_attribute("data-scale"))

                assert scale() == 1.0
                driver.find_element(By.ID, "viewer-zoom-in").click()
                assert scale() == pytest.approx(1.25, abs=1e-3)
                stage = driver.find_element(By.ID, "viewer-stage")
                stage.send_keys("+")
                assert scale() == pytest.approx(1.5625, abs=1e-3)
                assert driver.find_element(By.ID, "viewer-zoom-level").text == "156%"
                before = img.value_of_css_property("transform")
                stage.send_keys(Keys.ARROW_LEFT)
                assert img.value_of_css_property("transform") != before, "the arrow key pans the zoomed image"
                _check_page(driver, "viewer-zoomed", width)

                toggle = driver.find_element(By.ID, "viewer-overlay")
                assert toggle.get_attribute("aria-pressed") == "true"
                toggle.click()
                assert toggle.get_attribute("aria-pressed") == "false"
                wait.until(lambda drv, i=img: "/images/" in i.get_attribute("src") and _loaded(drv, i))
                assert img.get_attribute("alt") == f"{view_name} original image, no overlay"
                assert scale() == pytest.approx(1.5625, abs=1e-3), "the zoom stays while the overlay is switched"
                _check_page(driver, "viewer-original", width)
                stage.send_keys("o")
                wait.until(lambda drv, i=img, src=overlay_src: i.get_attribute("src") == src and _loaded(drv, i))
                stage.send_keys("0")
                assert scale() == 1.0
                stage.send_keys(Keys.ESCAPE)
                wait.until(lambda drv: drv.find_element(By.ID, "viewer").get_attribute("open") is None)
                assert driver.switch_to.active_element == first, "focus returns to the thumbnail that opened it"
        finally:
            driver.quit()
