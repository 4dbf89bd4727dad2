"""Honest pages (issue 19): messages only from the server's fixed set of keys, the dashboard's PROBLEMS as
``appliance status`` lists them with Ready false on a blocking one, HTML error pages for browsers and JSON for
the API, the over-the-air update column, and the viewer's original-image route (only this study's own
instances, from the spool directory). In process, as tests/test_web.py."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from appliance.app import readiness
from appliance.core.config import Settings
from appliance.web.accounts import Role
from appliance.web.pages import MESSAGES
from tests.test_web import Box, analysed_study

pytestmark = pytest.mark.unit

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.fixture
def box(home: Path) -> Box:
    return Box(home)


def _message(html: str) -> str | None:
    m = re.search(r'<p class="message[^"]*" id="message"[^>]*>([^<]*)</p>', html)
    return m.group(1) if m else None


@pytest.mark.parametrize(
    "query",
    [
        {"msg": "Your session expired: log in again at https://evil.example", "err": "1"},
        {"msg": "<script>alert(1)</script>"},
        {"msg": "__class__"},
        {"msg": "retry_done ", "err": "1"},
    ],
)
def test_a_crafted_msg_parameter_puts_nothing_on_any_page(box: Box, query: dict[str, str]) -> None:
    c, _ = box.page_login(Role.ADMIN)
    for path in ("/", "/worklist", "/technician", "/audit", "/users"):
        page = c.get(path, params=query)
        assert page.status_code == 200
        assert _message(page.text) is None, (path, query)
        assert "evil.example" not in page.text and "alert(1)" not in page.text


def test_a_known_message_key_shows_its_fixed_text_and_its_own_kind(box: Box) -> None:
    c, _ = box.page_login(Role.VIEWER)
    for key, (text, is_error) in MESSAGES.items():
        page = c.get("/", params={"msg": key, "err": "0" if is_error else "1"}).text  # err= is ignored
        assert _message(page) == text.replace("'", "&#39;")
        role = "alert" if is_error else "status"
        assert f'id="message" role="{role}"' in page


def test_a_refused_user_form_says_why_on_the_page_not_in_the_url(box: Box) -> None:
    c, csrf = box.page_login(Role.ADMIN)
    r = c.post("/users", data={"csrf_token": csrf, "username": "x", "role": "viewer", "password": "short"})
    assert r.status_code == 400 and "location" not in r.headers
    assert (_message(r.text) or "").startswith("Not added: ")
    ok = c.post(
        "/users", data={"csrf_token": csrf, "username": "nurse", "role": "viewer", "password": "tablet on the ward 42"}
    )
    assert ok.status_code == 303 and ok.headers["location"] == "/users?msg=user_added"


def test_the_c_echo_answer_is_shown_from_the_server_not_the_url(box: Box) -> None:
    c, csrf = box.page_login(Role.TECHNICIAN)
    r = c.post("/technician/echo", data={"csrf_token": csrf, "destination": "pacs"})
    assert r.status_code == 200 and "location" not in r.headers
    assert _message(r.text) == "C-ECHO pacs: OK: C-ECHO success" and box.calls == ["echo:pacs"]


def _settings_with(box: Box, **changes: Any) -> Settings:
    for k, v in changes.items():
        setattr(box.settings.pipeline, k, v)
    return box.settings


def test_the_dashboard_lists_every_status_problem_and_ready_is_false_on_a_blocking_one(box: Box) -> None:
    settings = _settings_with(box, destinations=[])  # no PACS: blocking (appliance.app.readiness.no_destination)
    found = readiness.problems(settings, box.store.conn)
    assert any(p.blocking for p in found), found
    box.ports.problems = lambda: [
        {"key": p.key, "message": p.message, "blocking": p.blocking} for p in readiness.problems(settings, None)
    ]
    c, _ = box.page_login(Role.VIEWER)
    page = c.get("/").text
    for p in readiness.problems(settings, None):
        assert f'data-key="{p.key}"' in page and p.message in page
    ready = re.search(r'id="readiness">\s*<h3>Ready</h3><p>(\w+)</p>', page)
    assert ready and ready.group(1) == "no"
    assert c.get("/api/v1/status").json()["ready"] is False
    # a problem that does not block shows, and Ready stays yes
    box.ports.problems = lambda: [
        {"key": "engines.trusted_keys", "message": "the demo key is trusted", "blocking": False}
    ]
    page = c.get("/").text
    assert 'data-key="engines.trusted_keys"' in page and "Fix soon" in page
    ready = re.search(r'id="readiness">\s*<h3>Ready</h3><p>(\w+)</p>', page)
    assert ready and ready.group(1) == "yes"


def test_the_over_the_air_update_column_shows_the_update_not_a_python_method(box: Box) -> None:
    box.ports.models = lambda: [
        {"bundle_id": "cxr", "version": "1.0.0", "state": "active", "installed_at": "t", "key_id": "k",
         "failure": None, "update": None},
        {"bundle_id": "cxr", "version": "1.1.0", "state": "installed", "installed_at": "t", "key_id": "k",
         "failure": None, "update": "health_gate 1.1.0"},
    ]  # fmt: skip
    c, _ = box.page_login(Role.TECHNICIAN)
    page = c.get("/technician").text
    assert "built-in method" not in page and "<td>health_gate 1.1.0</td>" in page
    assert "about a minute" not in page


@pytest.mark.parametrize("path", ["/technician", "/audit", "/users"])
def test_a_viewer_on_a_technician_page_gets_an_html_403_from_a_browser_and_json_from_the_api(
    box: Box, path: str
) -> None:
    c, _ = box.page_login(Role.VIEWER)
    page = c.get(path, headers=BROWSER)
    assert page.status_code == 403 and page.headers["content-type"].startswith("text/html")
    assert 'id="whoami"' in page.text and "viewer (viewer)" in page.text  # still logged in, with navigation
    assert "Error 403" in page.text
    navigated = c.get(path, headers={"Accept": "*/*", "Sec-Fetch-Dest": "document"})
    assert navigated.status_code == 403 and navigated.headers["content-type"].startswith("text/html")
    raw = c.get(path, headers={"Accept": "application/json"})
    assert raw.status_code == 403 and raw.json()["detail"]
    api = c.get("/api/v1/users", headers=BROWSER)
    assert api.status_code == 403 and api.headers["content-type"] == "application/json"


def test_the_viewer_s_original_image_comes_only_from_this_study_s_instances(box: Box) -> None:
    sid = analysed_study(box)
    other = analysed_study(box)
    c, _ = box.page_login(Role.VIEWER)
    page = c.get(f"/studies/{sid}").text
    originals = re.findall(r'data-original="([^"]+)"', page)
    overlays = re.findall(r'data-overlay="([^"]+)"', page)
    assert len(originals) == len(overlays) == 1, page
    assert re.search(r'<img class="overlay" src="[^"]+" alt="Image 1 with AI overlay">', page)  # no laterality/view
    png = c.get(originals[0])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as im:
        assert im.size == (240, 300)  # the received image's Columns x Rows (synthetic_image(300, 240))
    uid = originals[0].rsplit("/", 1)[1].removesuffix(".png")
    assert c.get(f"/studies/{other}/images/{uid}.png").status_code == 404  # another study's image
    for bad in ("..%2F..%2Fstate.db", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "1.2.3"):
        assert c.get(f"/studies/{sid}/images/{bad}.png").status_code == 404, bad
    with box.store.transaction() as conn:  # a tampered database row pointing out of the spool
        conn.execute("UPDATE instances SET path=? WHERE sop_instance_uid=?", ("../../../etc/passwd", uid))
    r = c.get(originals[0])
    assert r.status_code == 404 and "root:" not in r.text
    assert box.client().get(originals[0]).status_code == 303  # no session: to the login page
