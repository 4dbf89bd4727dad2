"""The central report's HTML page: self-contained (nothing fetched), its ROC points right, and axe-core clean in
real headless Chromium (Debian's chromium + chromedriver through Selenium, axe-core from node_modules)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.central.report import Filters, build_report, parse_reference
from appliance.central.report_engine import DuckDBEngine
from appliance.central.report_html import render_html, roc_points
from testsupport.central_store import BUNDLE, make_store

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
AXE = Path(__file__).resolve().parents[1] / "node_modules" / "axe-core" / "axe.min.js"
EDGES = [round(i * 0.05, 2) for i in range(21)]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    fx = make_store(tmp_path_factory.mktemp("central") / "store")
    ref = parse_reference(
        *BUNDLE, {"n": 100, "score_edges": EDGES, "scores": {"nodule": [5] * 20, "effusion": [5] * 20}}, None, "t"
    )
    engine = DuckDBEngine()
    try:
        return build_report(engine, fx.root, Filters(), [ref])
    finally:
        engine.close()


def test_roc_points_are_the_calibration_entries(report):
    rows = report["tables"]["calibration"]["rows"]
    points = roc_points(rows)
    for key, pts in points.items():
        mine = [r for r in rows if (r["site"], r["bundle_id"], r["bundle_version"], r["label"]) == key]
        expected = []
        for r in sorted(mine, key=lambda r: -r["threshold"]):
            tp, fp, fn, tn = r["tp"], r["fp"], r["fn"], r["tn"]
            if tp + fn and tn + fp:
                expected.append((fp / (fp + tn), tp / (tp + fn)))
        assert pts[0] == (0.0, 0.0) and pts[-1] == (1.0, 1.0)
        assert len(pts) == len(expected) + 2
        assert [c for p in pts[1:-1] for c in p] == pytest.approx([c for p in expected for c in p], abs=1e-12)
        xs = [p[0] for p in pts]
        assert xs == sorted(xs)  # lower thresholds refer more: the curve only moves right
    assert ("north", *BUNDLE, "nodule") in points


def test_page_is_self_contained(report, tmp_path):
    page = render_html(report)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert page.count("<svg") >= 3 * 2  # distributions, drift, ROC for both labels
    assert "Drift over time" in page and "ROC: cxr-phantom 1.0.1, nodule" in page


def test_cli_writes_html(report, tmp_path):
    from appliance.cli import app

    out = tmp_path / "r.html"
    res = CliRunner().invoke(app, ["central", "report", "--store", report["store"], "--html", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text().startswith("<!DOCTYPE html>")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.integration
def test_page_is_axe_clean_and_loads_nothing_in_chromium(report, tmp_path, browser):
    assert AXE.is_file(), "axe-core is not installed: run npm install (package.json)"
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    browser.get(page.as_uri())
    # nothing but the page itself was loaded (no CDN, no font, no image)
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert browser.execute_script("return document.querySelectorAll('svg[role=img] title').length") >= 6
    browser.execute_script(AXE.read_text(encoding="utf-8"))
    browser.set_script_timeout(120)
    result = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations), e => done(String(e)));"
    )
    assert isinstance(result, list), result
    bad = [(v["id"], v["impact"], v["help"], len(v["nodes"])) for v in result if v["impact"] in ("critical", "serious")]
    assert bad == []
