"""The dashboard and JSON API in process (FastAPI's TestClient over HTTPS URLs, no socket): accounts, roles,
sessions, CSRF, bad input of every kind, the worklist and a study with its overlay from a real pipeline run,
metrics and readiness."""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset

from appliance.core import audit
from appliance.core.config import PacsDestination, Settings
from appliance.core.store import Store
from appliance.ingest.header import parse_header
from appliance.ingest.records import record_instance
from appliance.lifecycle import studies
from appliance.lifecycle.studies import COMPLETE, INFERRED, RECEIVED
from appliance.pipeline.worker import PipelineWorker, StaticBundles
from appliance.web import accounts
from appliance.web.accounts import Role
from appliance.web.app import create_app
from appliance.web.metrics import ApplianceMetrics
from appliance.web.ports import WebPorts
from appliance.web.security import CSRF_HEADER, LOGIN_CSRF_COOKIE, SESSION_COOKIE
from testsupport.pipeline import TinyEngine, make_dataset, synthetic_image, tiny_manifest

pytestmark = pytest.mark.unit

PASSWORD = "correct horse battery"
BASE = "https://testserver"


class Box:
    """An app over a fresh state dir, with one user per role and recording ports."""

    def __init__(self, home: Path, **api: Any):
        self.settings = Settings(state_dir=home)
        for k, v in api.items():
            setattr(self.settings.api, k, v)
        self.settings.pipeline.destinations = [PacsDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=1)]
        self.store = Store(self.settings.db_path)
        for role in Role:
            accounts.add_user(self.store, role.value, role, PASSWORD)
        self.calls: list[str] = []
        self.metrics = ApplianceMetrics()
        self.ports = WebPorts(
            selftest=self._selftest,
            echo=self._echo,
            status_doc=lambda: {"dicom-scp": {"ae_title": "APPLIANCE", "host": "127.0.0.1", "port": 11112}},
            listener_up=lambda: True,
            engines=lambda: {
                "bundles_active": [{"bundle_id": "tiny", "version": "1.0.0", "backend": "numpy", "precision": "fp32"}],
                "backend": "numpy",
            },
        )
        self.app = create_app(self.settings, self.store, self.ports, self.metrics)

    def _selftest(self) -> dict[str, Any]:
        self.calls.append("selftest")
        return {"ok": False, "at": "now", "checks": [{"name": "disk", "ok": False, "detail": "full", "seconds": 0.0}]}

    def _echo(self, name: str) -> tuple[bool, str]:
        self.calls.append(f"echo:{name}")
        return True, "C-ECHO success"

    def client(self) -> TestClient:
        return TestClient(self.app, base_url=BASE, follow_redirects=False)

    def api_login(self, role: Role | str, client: TestClient | None = None) -> tuple[TestClient, str]:
        c = client or self.client()
        name = role.value if isinstance(role, Role) else role
        r = c.post("/api/v1/session", json={"username": name, "password": PASSWORD})
        assert r.status_code == 200, r.text
        return c, r.json()["csrf_token"]

    def page_login(self, role: Role) -> tuple[TestClient, str]:
        c = self.client()
        page = c.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        r = c.post("/login", data={"csrf_token": token, "username": role.value, "password": PASSWORD, "next": "/"})
        assert r.status_code == 303 and r.headers["location"] == "/", r.text
        home = c.get("/")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', home.text).group(1)  # type: ignore[union-attr]
        return c, csrf

    def events(self, event: str) -> list[audit.AuditEntry]:
        return audit.query(self.store, event=event)


@pytest.fixture
def box(home: Path) -> Box:
    return Box(home)


# -- a real analysed study (the pipeline worker on a tiny ONNX-free engine, as tests/test_worklist.py) -----------


def file_instance(settings: Settings, store: Store, ds: Dataset) -> int:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    rel = f"test/{ds.SOPInstanceUID}.dcm"
    path = settings.spool_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    header = parse_header(data, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID))
    rec = record_instance(
        store,
        header,
        rel_path=rel,
        size=len(data),
        sha256=str(ds.SOPInstanceUID),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        calling_ae="MODALITY",
        assoc_studies=set(),
    )
    return rec.study_id


def analysed_study(box: Box) -> int:
    ds = make_dataset(synthetic_image(300, 240, (100, 120), radius=10))
    sid = file_instance(box.settings, box.store, ds)
    with box.store.transaction() as conn:
        studies.transition(conn, sid, RECEIVED, COMPLETE, "test: complete", completed=True)
    worker = PipelineWorker(
        box.settings,
        box.store,
        StaticBundles([(tiny_manifest(), TinyEngine())]),
        on_analysed=box.metrics.observe_analysis,
    )
    assert worker.process(sid) == INFERRED
    return sid


# -- accounts ---------------------------------------------------------------------------------------------------


def test_passwords_are_argon2id_and_weak_or_duplicate_accounts_are_refused(box: Box) -> None:
    row = box.store.query("SELECT password_hash FROM users WHERE name='admin'")[0]
    assert row["password_hash"].startswith("$argon2id$") and PASSWORD not in row["password_hash"]
    with pytest.raises(accounts.AccountError, match="too short"):
        accounts.add_user(box.store, "newbie", Role.VIEWER, "short")
    with pytest.raises(accounts.AccountError, match="already exists"):
        accounts.add_user(box.store, "admin", Role.VIEWER, PASSWORD)
    with pytest.raises(accounts.AccountError, match="invalid user name"):
        accounts.add_user(box.store, "../x", Role.VIEWER, PASSWORD)
    with pytest.raises(accounts.AccountError, match="unknown role"):
        accounts.parse_role("root")


def test_session_tokens_are_stored_hashed_and_a_disabled_user_loses_their_sessions(box: Box) -> None:
    c, _ = box.api_login(Role.VIEWER)
    token = c.cookies.get(SESSION_COOKIE)
    stored = [r["token_sha256"] for r in box.store.query("SELECT token_sha256 FROM sessions")]
    assert token not in stored and accounts.token_hash(token) in stored
    assert c.get("/api/v1/me").status_code == 200
    accounts.set_disabled(box.store, "viewer", True)
    assert c.get("/api/v1/me").status_code == 401


def test_login_answers_set_a_secure_httponly_samesite_strict_cookie(box: Box) -> None:
    r = box.client().post("/api/v1/session", json={"username": "viewer", "password": PASSWORD})
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    for attr in ("Secure", "HttpOnly", "SameSite=strict", "Path=/"):
        assert attr.lower() in cookie.lower()
    assert "domain" not in cookie.lower()


# -- bad input: unauthenticated, wrong role ------------------------------------------------------------------------

API_ROUTES = [
    ("GET", "/api/v1/studies"),
    ("GET", "/api/v1/studies/1"),
    ("POST", "/api/v1/studies/1/retry"),
    ("POST", "/api/v1/studies/1/resend"),
    ("GET", "/api/v1/status"),
    ("GET", "/api/v1/models"),
    ("GET", "/api/v1/audit"),
    ("GET", "/api/v1/users"),
    ("POST", "/api/v1/users"),
    ("PATCH", "/api/v1/users/viewer"),
    ("POST", "/api/v1/echo"),
    ("POST", "/api/v1/selftest"),
    ("GET", "/api/v1/me"),
    ("DELETE", "/api/v1/session"),
]
PAGES = ["/", "/worklist", "/studies/1", "/studies/1/overlays/1.2.3.png", "/technician", "/audit", "/users"]


@pytest.mark.parametrize(("method", "path"), API_ROUTES)
def test_api_without_a_session_is_401(box: Box, method: str, path: str) -> None:
    r = box.client().request(method, path, json={})
    assert r.status_code == 401 and "not logged in" in r.json()["detail"]


@pytest.mark.parametrize("path", PAGES)
def test_pages_without_a_session_redirect_to_login(box: Box, path: str) -> None:
    r = box.client().get(path)
    assert r.status_code == 303 and r.headers["location"] == f"/login?next={path}"


@pytest.mark.parametrize(
    ("role", "method", "path"),
    [
        (Role.VIEWER, "POST", "/api/v1/studies/1/retry"),
        (Role.VIEWER, "POST", "/api/v1/studies/1/resend"),
        (Role.VIEWER, "POST", "/api/v1/echo"),
        (Role.VIEWER, "POST", "/api/v1/selftest"),
        (Role.VIEWER, "GET", "/api/v1/audit"),
        (Role.VIEWER, "GET", "/api/v1/users"),
        (Role.TECHNICIAN, "GET", "/api/v1/users"),
        (Role.TECHNICIAN, "POST", "/api/v1/users"),
        (Role.TECHNICIAN, "PATCH", "/api/v1/users/viewer"),
    ],
)
def test_api_with_a_role_too_low_is_403(box: Box, role: Role, method: str, path: str) -> None:
    c, csrf = box.api_login(role)
    r = c.request(method, path, json={}, headers={CSRF_HEADER: csrf})
    assert r.status_code == 403 and "role" in r.json()["detail"]
    assert box.calls == []  # nothing ran


@pytest.mark.parametrize(
    ("role", "method", "path"),
    [
        (Role.VIEWER, "GET", "/technician"),
        (Role.VIEWER, "GET", "/audit"),
        (Role.VIEWER, "POST", "/studies/1/retry"),
        (Role.VIEWER, "POST", "/studies/1/resend"),
        (Role.VIEWER, "POST", "/technician/echo"),
        (Role.VIEWER, "POST", "/technician/selftest"),
        (Role.TECHNICIAN, "GET", "/users"),
        (Role.TECHNICIAN, "POST", "/users"),
    ],
)
def test_pages_with_a_role_too_low_are_403(box: Box, role: Role, method: str, path: str) -> None:
    c, csrf = box.page_login(role)
    r = c.request(method, path, data={"csrf_token": csrf} if method == "POST" else None)
    assert r.status_code == 403
    assert box.calls == []


def test_a_viewer_sees_no_technician_buttons(box: Box) -> None:
    sid = analysed_study(box)
    c, _ = box.page_login(Role.VIEWER)
    page = c.get(f"/studies/{sid}").text
    assert 'id="retry"' not in page and 'id="resend"' not in page and "/technician" not in page
    c, _ = box.page_login(Role.TECHNICIAN)
    page = c.get(f"/studies/{sid}").text
    assert 'id="retry"' in page and 'id="resend"' in page


def test_study_pages_show_names_and_dates_as_people_read_them_and_positives_stand_out(box: Box) -> None:
    """The DICOM values (PN ``Test^Patient``, DA ``20240101``) are shown as a radiographer reads them; the
    JSON API keeps them as DICOM has them."""
    sid = analysed_study(box)
    c, _ = box.page_login(Role.VIEWER)
    page = c.get(f"/studies/{sid}").text
    assert "<h1>Test, Patient</h1>" in page and "Test^Patient" not in page
    assert "<th>Study date</th><td>2024-01-01</td>" in page
    assert re.search(r'<strong class="result positive">positive</strong>', page)
    worklist = c.get("/worklist").text
    assert ">Test, Patient</a>" in worklist
    assert '<td class="nowrap">P123</td>' in worklist  # an ID never breaks at its hyphen on a laptop screen
    api, _ = box.api_login(Role.VIEWER)
    assert api.get(f"/api/v1/studies/{sid}").json()["summary"]["patient_name"] == "Test^Patient"


# -- bad input: malformed and oversized bodies ----------------------------------------------------------------------


def test_malformed_json_is_422_with_a_message(box: Box) -> None:
    c = box.client()
    r = c.post(
        "/api/v1/session", content=b'{"username": "admin", "password": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and "invalid request" in r.json()["detail"] and "JSON" in r.json()["detail"]
    r = c.post("/api/v1/session", json={"username": "admin"})
    assert r.status_code == 422 and "password" in r.json()["detail"]
    r = c.post("/api/v1/session", json={"username": "admin", "password": PASSWORD, "role": "admin"})
    assert r.status_code == 422 and "role" in r.json()["detail"]  # unknown fields are refused
    c, csrf = box.api_login(Role.ADMIN)
    r = c.post(
        "/api/v1/users", json={"username": "x", "role": "root", "password": PASSWORD}, headers={CSRF_HEADER: csrf}
    )
    assert r.status_code == 422 and "role" in r.json()["detail"]
    assert accounts.get_user(box.store, "x") is None


def test_oversized_bodies_are_413_whether_announced_or_streamed(box: Box) -> None:
    limit = box.settings.api.max_body_bytes
    c = box.client()
    r = c.post("/api/v1/session", content=b"x" * (limit + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "too large" in r.text.lower()

    def chunks() -> Any:
        for _ in range(limit // 1024 + 2):
            yield b"y" * 1024

    r = c.post("/api/v1/session", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "too large" in r.text.lower()
    page = c.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    r = c.post("/login", data={"csrf_token": token, "username": "admin", "password": "p" * (limit + 10)})
    assert r.status_code == 413


# -- bad input: path traversal on every route that serves files ------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/static/../../core/config.py",
        "/static/%2e%2e/%2e%2e/core/config.py",
        "/static/..%2f..%2fcore%2fconfig.py",
        "/static/%2fetc%2fpasswd",
        "/static//etc/passwd",
    ],
)
def test_static_files_cannot_be_left(box: Box, path: str) -> None:
    r = box.client().get(path)
    assert r.status_code == 404
    assert "class Settings" not in r.text and "root:" not in r.text


def test_overlays_are_served_only_from_the_study_s_own_result_files(box: Box) -> None:
    sid = analysed_study(box)
    c, _ = box.page_login(Role.VIEWER)
    page = c.get(f"/studies/{sid}").text
    srcs = re.findall(r'<img class="overlay" src="([^"]+)"', page)
    assert srcs, page
    png = c.get(srcs[0])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as im:
        assert im.format == "PNG" and im.size[0] > 100
    secret = box.settings.state_dir / "secrets" / "stolen.dcm"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_bytes(b"not for you")
    for bad in ("..%2F..%2Fstate.db", "..%2fsecrets%2fstolen", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "1.2.3"):
        r = c.get(f"/studies/{sid}/overlays/{bad}.png")
        assert r.status_code == 404, bad
    # a result row pointing outside the state dir (a tampered database) is refused before any file is opened
    obj = box.store.query("SELECT id, sop_instance_uid FROM result_objects WHERE kind='SC'")[0]
    with box.store.transaction() as conn:
        conn.execute("UPDATE result_objects SET path=? WHERE id=?", ("/etc/passwd", obj["id"]))
    r = c.get(f"/studies/{sid}/overlays/{obj['sop_instance_uid']}.png")
    assert r.status_code == 404 and "root:" not in r.text
    with box.store.transaction() as conn:
        conn.execute("UPDATE result_objects SET path=? WHERE id=?", ("../../../../etc/passwd", obj["id"]))
    assert c.get(f"/studies/{sid}/overlays/{obj['sop_instance_uid']}.png").status_code == 404


# -- bad input: brute force, CSRF, fixation, expiry ---------------------------------------------------------------


def test_wrong_passwords_from_one_address_are_delayed_exponentially(box: Box) -> None:
    """Per user and address, the first 3 wrong passwords are free; the next try must wait (429 + Retry-After),
    audited as ``delayed``: an attacker at one address is slowed, the user is not locked out."""
    c = box.client()
    for _ in range(3):
        assert c.post("/api/v1/session", json={"username": "technician", "password": "wrong!"}).status_code == 401
    r = c.post("/api/v1/session", json={"username": "technician", "password": PASSWORD})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert box.events("login_failed")[0].detail["reason"] == "delayed"
    assert box.events("lockout") == []


def test_brute_force_locks_the_user_against_new_addresses_and_is_audited(box: Box) -> None:
    """Past ``api.lockout_attempts`` failures the account is locked against addresses it never logged in from
    (this client has not): even the right password is refused, audited; the lock ends after ``api.lockout_s``."""
    from appliance.web.security import LoginDelay

    box.app.state.auth.delay = LoginDelay(free=1000)  # the per-pair delay is tested above; here: the lock alone
    c = box.client()
    n = box.settings.api.lockout_attempts
    for _ in range(n):
        r = c.post("/api/v1/session", json={"username": "technician", "password": "wrong password!"})
        assert r.status_code == 401
    r = c.post("/api/v1/session", json={"username": "technician", "password": PASSWORD})
    assert r.status_code == 401 and "locked" in r.json()["detail"]
    assert [e.subject for e in box.events("lockout")] == ["technician"]
    assert len(box.events("login_failed")) == n + 1
    assert box.events("login_failed")[0].detail == {"reason": "locked"}
    with box.store.transaction() as conn:  # the lockout ends after api.lockout_s
        conn.execute("UPDATE users SET locked_until=? WHERE name='technician'", (1.0,))
    box.api_login(Role.TECHNICIAN, c)


def test_many_failures_from_one_address_get_429(home: Path) -> None:
    box = Box(home, ip_max_failures=3, lockout_attempts=50)
    c = box.client()
    codes = [c.post("/api/v1/session", json={"username": f"nobody{i}", "password": "x"}).status_code for i in range(4)]
    assert codes == [401, 401, 401, 429]
    r = c.post("/api/v1/session", json={"username": "admin", "password": PASSWORD})
    assert r.status_code == 429 and "too many" in r.json()["detail"]


def test_state_changing_api_calls_need_the_session_s_csrf_token(box: Box) -> None:
    sid = analysed_study(box)
    c, csrf = box.api_login(Role.TECHNICIAN)
    for headers in ({}, {CSRF_HEADER: "wrong"}, {CSRF_HEADER: ""}):
        r = c.post(f"/api/v1/studies/{sid}/retry", headers=headers)
        assert r.status_code == 403 and CSRF_HEADER in r.json()["detail"]
        r = c.post("/api/v1/echo", json={"destination": "pacs"}, headers=headers)
        assert r.status_code == 403
    assert box.calls == [] and box.store.query("SELECT state FROM studies WHERE id=?", (sid,))[0][0] == INFERRED
    r = c.post("/api/v1/echo", json={"destination": "pacs"}, headers={CSRF_HEADER: csrf})
    assert r.status_code == 200 and r.json()["ok"] and box.calls == ["echo:pacs"]


def test_state_changing_forms_need_the_session_s_csrf_token(box: Box) -> None:
    sid = analysed_study(box)
    c, csrf = box.page_login(Role.ADMIN)
    for data in ({}, {"csrf_token": "wrong"}):
        assert c.post(f"/studies/{sid}/retry", data=data).status_code == 403
        assert c.post("/technician/echo", data={**data, "destination": "pacs"}).status_code == 403
        assert (
            c.post("/users", data={**data, "username": "eve", "role": "admin", "password": PASSWORD}).status_code == 403
        )
        assert c.post("/logout", data=data).status_code == 403
    assert accounts.get_user(box.store, "eve") is None and box.calls == []
    r = c.post(f"/studies/{sid}/retry", data={"csrf_token": csrf})
    assert r.status_code == 303
    assert box.store.query("SELECT state FROM studies WHERE id=?", (sid,))[0][0] == COMPLETE


def test_a_refused_action_reads_as_a_refusal_not_as_a_confirmation(box: Box) -> None:
    sid = analysed_study(box)
    c, csrf = box.page_login(Role.TECHNICIAN)
    done = c.post(f"/studies/{sid}/retry", data={"csrf_token": csrf}, follow_redirects=True).text
    assert '<p class="message" id="message" role="status">Analysis requested again' in done
    refused = c.post(f"/studies/{sid}/retry", data={"csrf_token": csrf}, follow_redirects=True).text  # not analysed
    assert '<p class="message error" id="message" role="alert">Retry refused: ' in refused


def test_the_login_form_needs_its_csrf_cookie_and_field(box: Box) -> None:
    c = box.client()
    r = c.post("/login", data={"username": "admin", "password": PASSWORD})
    assert r.status_code == 403
    c.get("/login")
    r = c.post("/login", data={"csrf_token": "forged", "username": "admin", "password": PASSWORD})
    assert r.status_code == 403 and SESSION_COOKIE not in r.headers.get("set-cookie", "")
    assert c.cookies.get(LOGIN_CSRF_COOKIE)


def test_a_failed_login_keeps_the_name_typed_escaped_never_the_password(box: Box) -> None:
    c = box.client()
    page = c.get("/login").text
    assert 'value=""' in page and "autofocus" in page.split('id="password"')[0]  # the name field first
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    for typed, shown in (("technician", 'value="technician"'), ('"><b>x', 'value="&#34;&gt;&lt;b&gt;x"')):
        r = c.post("/login", data={"csrf_token": token, "username": typed, "password": "wrong password!"})
        assert r.status_code == 401 and "invalid user name or password" in r.text
        assert shown in r.text and "wrong password!" not in r.text
        assert "autofocus" in r.text.split('id="password"')[1].split(">")[0]  # the cursor waits in the password
        token = re.search(r'name="csrf_token" value="([^"]+)"', r.text).group(1)  # type: ignore[union-attr]


def test_a_session_id_the_browser_brought_is_never_adopted(box: Box) -> None:
    c = box.client()
    planted = "attacker-chosen-session-id"
    c.cookies.set(SESSION_COOKIE, planted, domain="testserver.local")
    r = c.post("/api/v1/session", json={"username": "admin", "password": PASSWORD})
    assert planted in r.request.headers["cookie"]  # the planted id really was presented at login
    issued = re.search(rf"{re.escape(SESSION_COOKIE)}=([^;]+)", r.headers["set-cookie"]).group(1)  # type: ignore[union-attr]
    assert issued != planted
    attacker = box.client()
    attacker.cookies.set(SESSION_COOKIE, planted, domain="testserver.local")
    assert attacker.get("/api/v1/me").status_code == 401
    # a second login from the same browser replaces the session: the first token stops working
    old = box.client()
    old.cookies.set(SESSION_COOKIE, issued, domain="testserver.local")
    assert old.get("/api/v1/me").status_code == 200
    r2 = old.post("/api/v1/session", json={"username": "admin", "password": PASSWORD})
    assert r2.status_code == 200
    stale = box.client()
    stale.cookies.set(SESSION_COOKIE, issued, domain="testserver.local")
    assert stale.get("/api/v1/me").status_code == 401


@pytest.mark.parametrize("column", ["last_seen_at", "created_at"])
def test_an_expired_session_is_401_and_deleted(box: Box, column: str) -> None:
    c, _ = box.api_login(Role.VIEWER)
    assert c.get("/api/v1/me").status_code == 200
    age = box.settings.api.session_ttl_s if column == "last_seen_at" else box.settings.api.session_max_s
    with box.store.transaction() as conn:
        conn.execute(f"UPDATE sessions SET {column} = {column} - ?", (age + 1,))
    assert c.get("/api/v1/me").status_code == 401
    assert box.store.query("SELECT COUNT(*) FROM sessions")[0][0] == 0
    assert c.get("/").status_code == 303  # a page sends the browser back to the login


def test_sessions_abandoned_past_their_timeout_are_deleted_at_the_next_login(box: Box) -> None:
    box.api_login(Role.VIEWER)
    box.api_login(Role.ADMIN)
    with box.store.transaction() as conn:
        conn.execute(
            "UPDATE sessions SET last_seen_at = last_seen_at - ?"
            " WHERE user_id = (SELECT id FROM users WHERE name = 'viewer')",
            (box.settings.api.session_ttl_s + 1,),
        )
    box.api_login(Role.TECHNICIAN)
    names = box.store.query("SELECT u.name FROM sessions s JOIN users u ON u.id = s.user_id ORDER BY u.name")
    assert [r["name"] for r in names] == ["admin", "technician"]


def test_logout_ends_the_session_and_is_audited(box: Box) -> None:
    c, csrf = box.api_login(Role.VIEWER)
    assert c.delete("/api/v1/session", headers={CSRF_HEADER: csrf}).status_code == 204
    assert c.get("/api/v1/me").status_code == 401
    assert [e.actor for e in box.events("logout")] == ["viewer"]
    assert [e.actor for e in box.events("login")] == ["viewer"]


def test_login_redirects_only_to_local_paths(box: Box) -> None:
    c = box.client()
    page = c.get("/login?next=//evil.example/")
    assert 'value="/"' in page.text and "evil" not in page.text


# -- the worklist, a study, actions, audit ---------------------------------------------------------------------------


def test_worklist_study_and_actions_through_the_api(box: Box) -> None:
    sid = analysed_study(box)
    c, csrf = box.api_login(Role.TECHNICIAN)
    rows = c.get("/api/v1/studies").json()
    assert [r["id"] for r in rows] == [sid]
    assert rows[0]["findings"] and rows[0]["state"] == INFERRED
    assert c.get("/api/v1/studies", params={"since": "not-a-date"}).status_code == 422
    detail = c.get(f"/api/v1/studies/{sid}").json()
    assert detail["summary"]["id"] == sid and detail["timeline"]
    assert c.get("/api/v1/studies/999999").status_code == 404
    assert [e.subject for e in box.events("study_viewed")] == [f"study:{sid}"]
    assert c.post(f"/api/v1/studies/{sid}/retry", headers={CSRF_HEADER: csrf}).json() == {"state": COMPLETE}
    r = c.post(f"/api/v1/studies/{sid}/retry", headers={CSRF_HEADER: csrf})
    assert r.status_code == 409 and r.json()["detail"]  # already waiting for analysis: refused with the reason
    assert [e.actor for e in box.events("study_retry")] == ["technician"]
    assert c.post("/api/v1/echo", json={"destination": "nope"}, headers={CSRF_HEADER: csrf}).status_code == 404
    report = c.post("/api/v1/selftest", headers={CSRF_HEADER: csrf}).json()
    assert report["ok"] is False
    st = box.events("selftest")[0]
    assert st.outcome == "failure" and st.detail == {"failed": ["disk"]}


def test_pages_render_the_dashboard_worklist_study_technician_audit_and_users(box: Box) -> None:
    sid = analysed_study(box)
    c, csrf = box.page_login(Role.ADMIN)
    dash = c.get("/")
    assert dash.status_code == 200 and "DICOM listener" in dash.text and f"/studies/{sid}" in dash.text
    wl = c.get("/worklist", params={"state": INFERRED})
    assert f"/studies/{sid}" in wl.text
    assert f"/studies/{sid}" not in c.get("/worklist", params={"state": "failed"}).text
    assert c.get("/worklist", params={"since": "yesterday"}).status_code == 400
    tech = c.get("/technician").text
    assert "C-ECHO" in tech and "state_dir" in tech
    assert c.get("/audit", params={"event": "login"}).text.count('data-event="login"') == 1
    r = c.post("/users", data={"csrf_token": csrf, "username": "clinic", "role": "viewer", "password": PASSWORD})
    assert r.status_code == 303 and accounts.get_user(box.store, "clinic") is not None
    assert [e.subject for e in box.events("user_added")] == ["clinic"]
    r = c.post("/users/clinic/disable", data={"csrf_token": csrf})
    assert r.status_code == 303 and accounts.get_user(box.store, "clinic").disabled  # type: ignore[union-attr]
    users = c.get("/users").text  # a button for each other user; none that would only be refused for oneself
    assert 'action="/users/clinic/enable"' in users and 'action="/users/admin/' not in users


def test_the_technician_page_redacts_secrets(home: Path) -> None:
    box = Box(home)
    box.settings.cloud.recipient_keys = {"central-1": "QUJD" * 11}
    c, _ = box.page_login(Role.TECHNICIAN)
    page = c.get("/technician").text
    assert "QUJD" not in page and "central-1" in page


# -- health, readiness, metrics ------------------------------------------------------------------------------------


def test_readyz_names_what_is_missing(home: Path) -> None:
    box = Box(home)
    c = box.client()
    assert c.get("/healthz").text == "ok\n"
    assert c.get("/readyz").json() == {"ready": True, "reasons": []}
    box.ports.listener_up = lambda: False
    box.ports.engines = lambda: {"bundles_active": [], "backend": "ort"}
    r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["reasons"] == [
        "DICOM listener is not accepting associations",
        "no model loaded (every study would end no_model)",
    ]


def test_metrics_count_studies_and_observe_inference_latency(box: Box) -> None:
    analysed_study(box)
    text = box.client().get("/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("appliance_studies_received_total", ())] == 1
    assert samples[("appliance_studies_processed_total", ())] == 1
    assert samples[("appliance_studies_failed_total", ())] == 0
    assert samples[("appliance_studies", (("state", "inferred"),))] == 1
    assert samples[("appliance_inference_seconds_count", (("bundle_id", tiny_manifest().bundle_id),))] == 1
    assert samples[("appliance_disk_free_bytes", ())] > 0
    assert samples[("appliance_cloud_connected", ())] == 0
    assert samples[("appliance_models_loaded", ())] == 1


def test_admins_change_users_through_the_api_but_not_themselves(box: Box) -> None:
    c, csrf = box.api_login(Role.ADMIN)
    h = {CSRF_HEADER: csrf}
    r = c.patch("/api/v1/users/viewer", json={"role": "technician"}, headers=h)
    assert r.status_code == 200 and r.json()["role"] == "technician"
    assert c.patch("/api/v1/users/admin", json={"disabled": True}, headers=h).status_code == 400
    assert c.patch("/api/v1/users/admin", json={"role": "viewer"}, headers=h).status_code == 400
    assert c.patch("/api/v1/users/ghost", json={"disabled": True}, headers=h).status_code == 404
    assert c.patch("/api/v1/users/viewer", json={}, headers=h).status_code == 400
    assert c.patch("/api/v1/users/viewer", json={"password": "short"}, headers=h).status_code == 422
    r = c.post("/api/v1/users", json={"username": "viewer", "role": "viewer", "password": PASSWORD}, headers=h)
    assert r.status_code == 409
    assert [(e.subject, e.detail) for e in box.events("user_changed")] == [("viewer", {"role": "technician"})]


def test_user_add_asks_for_the_password_twice(home: Path, clean_env: None) -> None:
    from typer.testing import CliRunner

    from appliance.cli import app

    runner = CliRunner()
    args = ["--home", str(home), "user", "add", "alice", "--role", "admin"]
    differ = runner.invoke(app, args, input=f"{PASSWORD}\nsomething else\n")
    assert differ.exit_code == 1 and "differ" in differ.output
    ok = runner.invoke(app, args, input=f"{PASSWORD}\n{PASSWORD}\n")
    assert ok.exit_code == 0, ok.output
    store = Store(home / "state.db")
    user = accounts.get_user(store, "alice")
    assert user is not None and user.role is Role.ADMIN
    assert PASSWORD not in ok.output
    outcome, _ = accounts.authenticate(store, Settings(state_dir=home).api, "alice", PASSWORD)
    assert outcome is accounts.LoginOutcome.OK


@pytest.mark.unit
def test_model_rows_carry_each_bundles_over_the_air_update() -> None:
    from appliance.web.ports import with_update_states

    rows = [
        {"bundle_id": "cxr", "version": "1.0.0", "state": "active"},
        {"bundle_id": "cxr", "version": "1.1.0", "state": "installed"},
        {"bundle_id": "mmg", "version": "2.0.0", "state": "active"},
    ]
    updates = {
        "cxr": {"state": "health_gate", "version": "1.1.0", "reason": None},
        "mmg": {"state": "downloading", "version": "2.1.0", "reason": None},  # target not installed yet
        "ct": {"state": "failed", "version": "0.9.0", "reason": "golden mismatch"},  # never installed
    }
    out = {(r["bundle_id"], r["version"]): r["update"] for r in with_update_states(rows, updates)}
    assert out == {
        ("cxr", "1.0.0"): None,
        ("cxr", "1.1.0"): "health_gate 1.1.0",
        ("mmg", "2.0.0"): "downloading 2.1.0",
        ("ct", "0.9.0"): "failed 0.9.0: golden mismatch",
    }


def _at_once(n: int, attempt: Any) -> list[Any]:
    """``attempt()`` from ``n`` threads released together (a brute force that does not wait for answers)."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        results[i] = attempt()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def test_concurrent_wrong_passwords_get_no_more_guesses_than_the_lockout_allows(home: Path) -> None:
    box = Box(home, lockout_attempts=3, ip_max_failures=1000)
    outcomes = _at_once(
        12, lambda: accounts.authenticate(box.store, box.settings.api, "technician", "wrong password!")[0]
    )
    checked = [o for o in outcomes if o in (accounts.LoginOutcome.BAD_CREDENTIALS, accounts.LoginOutcome.LOCKED_NOW)]
    assert len(checked) == 3, outcomes  # only lockout_attempts passwords were ever checked
    assert outcomes.count(accounts.LoginOutcome.LOCKED_NOW) == 1
    assert outcomes.count(accounts.LoginOutcome.LOCKED) == 9
    user = accounts.get_user(box.store, "technician")
    assert user is not None and user.locked_until is not None
    outcome, _ = accounts.authenticate(box.store, box.settings.api, "technician", PASSWORD)
    assert outcome is accounts.LoginOutcome.LOCKED


def test_concurrent_failed_logins_from_one_address_get_no_more_tries_than_the_limit(home: Path) -> None:
    box = Box(home, ip_max_failures=3, lockout_attempts=100)

    def attempt() -> int:
        with box.client() as c:
            return c.post("/api/v1/session", json={"username": "viewer", "password": "wrong password!"}).status_code

    codes = _at_once(10, attempt)
    assert sorted(codes) == [401] * 3 + [429] * 7, codes
    assert len([e for e in box.events("login_failed") if e.detail == {"reason": "bad_credentials"}]) == 3


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/studies/99999999999999999999999"),  # beyond SQLite's 64-bit integers
        ("POST", "/api/v1/studies/99999999999999999999999/retry"),
        ("POST", "/api/v1/studies/99999999999999999999999/resend"),
        ("GET", "/api/v1/studies/%C2%B2"),  # "²": str.isdigit() says yes, int() says no
        ("GET", "/api/v1/studies/%D9%A3"),  # an Arabic-Indic digit three
        ("GET", "/api/v1/audit?offset=99999999999999999999"),
        ("GET", "/studies/99999999999999999999"),
        ("GET", "/studies/99999999999999999999/overlays/1.2.3.png"),
        ("POST", "/studies/99999999999999999999/retry"),
    ],
)
def test_numbers_out_of_range_are_a_client_error_not_a_crash(box: Box, method: str, path: str) -> None:
    c, csrf = box.api_login(Role.ADMIN, TestClient(box.app, base_url=BASE, raise_server_exceptions=False))
    form = {"csrf_token": csrf} if not path.startswith("/api/") and method == "POST" else None
    r = c.request(method, path, headers={CSRF_HEADER: csrf}, data=form, follow_redirects=False)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])


def test_the_address_limit_counts_an_ipv6_client_by_its_64_prefix(home: Path) -> None:
    """An IPv6 host picks any address in its /64 itself (SLAAC, privacy addresses): counted per address it
    would get a fresh budget for each; counted per /64 it gets one. An IPv4-mapped address is its IPv4."""
    box = Box(home, ip_max_failures=3, lockout_attempts=50)

    def attempt(address: str) -> int:
        c = TestClient(box.app, base_url=BASE, client=(address, 50000))
        return c.post("/api/v1/session", json={"username": "viewer", "password": "wrong password!"}).status_code

    codes = [attempt(f"2001:db8:1:2::{i:x}") for i in range(1, 5)]
    assert codes == [401, 401, 401, 429]
    assert attempt("2001:db8:1:3::1") == 401  # another /64: another host
    assert [attempt("192.0.2.7"), attempt("::ffff:192.0.2.7"), attempt("192.0.2.7"), attempt("::ffff:192.0.2.7")] == [
        401,
        401,
        401,
        429,
    ]
    assert attempt("192.0.2.8") == 401
