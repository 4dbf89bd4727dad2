"""The server-rendered pages (Jinja2 templates in ``templates/``, CSS in ``static/``; nothing from the internet).

Every page needs a live session (otherwise a redirect to ``/login``); technician pages and buttons need the
technician role, the users page the admin role. Every form that changes something posts the session's CSRF token.
After an action the page redirects back (POST/redirect/GET) with a message *key* in the query string
(``?msg=retry_done``): the page shows that key's text from :data:`MESSAGES`, a fixed server-side set, so a crafted
link cannot put words of its own on a page; an unknown key shows nothing. A message that carries server-made detail
(a C-ECHO answer, why a user was not added) is rendered on the page the form posted to, never passed in the URL.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from datetime import date, datetime
from pathlib import Path as FsPath
from typing import Annotated, Any

import pydicom.errors
from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from appliance.core import audit
from appliance.core.audit import AuditEvent, record_event
from appliance.core.safe_names import UnsafePath, resolve_under
from appliance.core.store import MAX_INTEGER
from appliance.web import accounts, service
from appliance.web.accounts import AccountError, Role, Session
from appliance.web.app import WebContext
from appliance.web.overlay import sc_to_png
from appliance.web.security import (
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    client_ip,
    cookie_args,
    page_role,
    session_of,
)
from appliance.worklist.display import dicom_date, person_name

router = APIRouter(include_in_schema=False)

StudyId = Annotated[int, Path(ge=0, le=MAX_INTEGER, description="a study's row id")]  # 422 beyond, not a crash
viewer = Depends(page_role(Role.VIEWER))
technician = Depends(page_role(Role.TECHNICIAN))
admin = Depends(page_role(Role.ADMIN))

SECRET_KEYS = ("key", "secret", "password", "token")

# key -> (text, is an error): the only texts ``?msg=`` can put on a page
MESSAGES: dict[str, tuple[str, bool]] = {
    "feedback_sent": ("Feedback recorded and sent to the central team.", False),
    "feedback_kept": ("Feedback recorded (kept on this box).", False),
    "feedback_invalid": ("Feedback not recorded: that verdict, finding or outcome is not one this study offers.", True),
    "feedback_closed": ("Feedback not recorded: this study has no AI result to judge, or it was purged.", True),
    "feedback_unavailable": ("Feedback not recorded: the box could not store it now; try again in a minute.", True),
    "retry_done": ("Analysis requested again.", False),
    "retry_refused": ("Retry refused: this study cannot be analysed again in its present state.", True),
    "resend_done": ("Result objects queued for the PACS again.", False),
    "resend_refused": ("Resend refused: this study has no result objects to send.", True),
    "user_added": ("User added.", False),
    "user_changed": ("User changed.", False),
}


def _ctx(request: Request) -> WebContext:
    return request.app.state.web  # type: ignore[no-any-return]


def _render(request: Request, template: str, session: Session | None, **values: Any) -> HTMLResponse:
    """``template`` with the base values (user, roles, CSRF token, the message of ``?msg=KEY``, formatters);
    ``values`` add to or override them (``message``/``message_is_error`` for a server-made message)."""
    ctx = _ctx(request)
    message, is_error = MESSAGES.get(request.query_params.get("msg", ""), ("", False))
    base = {
        "user": session.user if session else None,
        "is_technician": bool(session and session.user.role.at_least(Role.TECHNICIAN)),
        "is_admin": bool(session and session.user.role.at_least(Role.ADMIN)),
        "csrf_token": session.csrf_token if session else "",
        "message": message,
        "message_is_error": is_error,
        "fmt_time": _fmt_time,
        "fmt_bytes": _fmt_bytes,
        "fmt_name": person_name,
        "fmt_date": dicom_date,
        "title": template.removesuffix(".html"),
        "device": ctx.settings.dicom.ae_title,
    }
    return ctx.templates.TemplateResponse(request, template, {**base, **values})


def error_page(request: Request, status: int, detail: str, headers: Mapping[str, str] | None = None) -> HTMLResponse:
    """The HTML error page a browser gets (the API gets JSON): the status, the server's reason, the navigation of
    the user logged in (a viewer sent away from a technician page can go on working)."""
    try:
        session = session_of(request)
    except Exception:  # the error may be the database's: the page still renders, without a user
        session = None
    page = _render(request, "error.html", session, status=status, detail=detail, message="")
    page.status_code = status
    for name, value in (headers or {}).items():
        page.headers[name] = value
    return page


def _fmt_time(ts: float | str | None) -> str:
    if ts is None or ts == "":
        return ""
    if isinstance(ts, str):
        return ts.replace("T", " ")[:19]
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _back(path: str, key: str) -> RedirectResponse:
    """303 to ``path`` showing the text of :data:`MESSAGES` ``key`` once (red when it is a refusal)."""
    if key not in MESSAGES:
        raise KeyError(key)  # a programming error: every key shown must be in the fixed set
    return RedirectResponse(f"{path}?msg={key}", status_code=303)


def _safe_next(target: str | None) -> str:
    """Only a local path: ``//host`` or ``https://...`` would be an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


# -- login ----------------------------------------------------------------------------------------------------------


@router.get("/login")
def login_page(request: Request, next: str = "/") -> Response:
    if session_of(request) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    token = secrets.token_urlsafe(24)
    response = _render(request, "login.html", None, login_csrf=token, next=_safe_next(next), error="", username="")
    response.set_cookie(LOGIN_CSRF_COOKIE, token, **cookie_args(max_age=3600))
    return response


@router.post("/login")
async def login_submit(request: Request) -> Response:
    form = await request.form()
    presented, cookie = form.get(CSRF_FIELD), request.cookies.get(LOGIN_CSRF_COOKIE)
    if not (isinstance(presented, str) and cookie and secrets.compare_digest(presented, cookie)):
        raise HTTPException(403, "missing or wrong CSRF token: reload the login page and try again")
    name, password = form.get("username"), form.get("password")
    raw_next = form.get("next")
    next_path = _safe_next(raw_next if isinstance(raw_next, str) else "/")
    if not isinstance(name, str) or not isinstance(password, str) or not name or not password:
        raise HTTPException(400, "user name and password are required")
    try:
        # argon2 and the database off the event loop
        token, _session = await run_in_threadpool(service.login, _ctx(request), request, name, password)
    except HTTPException as exc:
        if exc.status_code not in (401, 429):
            raise
        fresh = secrets.token_urlsafe(24)
        # the name typed stays (autoescaped), the password is typed again
        page = _render(
            request, "login.html", None, login_csrf=fresh, next=next_path, error=str(exc.detail), username=name[:64]
        )
        page.status_code = exc.status_code
        page.set_cookie(LOGIN_CSRF_COOKIE, fresh, **cookie_args(max_age=3600))
        return page
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(SESSION_COOKIE, token, **cookie_args())
    response.delete_cookie(LOGIN_CSRF_COOKIE, secure=True, httponly=True, samesite="strict")
    return response


@router.post("/logout")
def logout(request: Request, session: Session = viewer) -> Response:
    service.logout(_ctx(request), request, session)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, secure=True, httponly=True, samesite="strict")
    return response


# -- dashboard, worklist, study --------------------------------------------------------------------------------------


@router.get("/")
def dashboard(request: Request, session: Session = viewer) -> Response:
    ctx = _ctx(request)
    status = service.dashboard(ctx)
    urgent = service.worklist(ctx, None, None, None, None, True, 20)
    recent = service.worklist(ctx, None, None, None, None, False, 15)
    return _render(request, "dashboard.html", session, status=status, urgent=urgent, recent=recent)


def _day(value: str | None, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise HTTPException(400, f"{name}: not a date (YYYY-MM-DD): {value[:40]!r}") from None


@router.get("/worklist")
def worklist(
    request: Request,
    since: str | None = None,
    until: str | None = None,
    state: str | None = None,
    finding: str | None = None,
    urgent: str | None = None,
    session: Session = viewer,
) -> Response:
    ctx = _ctx(request)
    rows = service.worklist(ctx, _day(since, "since"), _day(until, "until"), state, finding, urgent == "1", 500)
    rows.sort(key=lambda s: not s.urgent)  # urgent findings first, newest first within each group
    filters = {
        "since": since or "",
        "until": until or "",
        "state": state or "",
        "finding": finding or "",
        "urgent": urgent == "1",
    }
    return _render(request, "worklist.html", session, rows=rows, filters=filters)


@router.get("/studies/{study_id}")
def study_page(study_id: StudyId, request: Request, session: Session = viewer) -> Response:
    ctx = _ctx(request)
    detail = service.study(ctx, request, session, str(study_id))
    fb = service.study_feedback(ctx, str(study_id))
    verdicts = {(e["bundle_id"], e["label"]): e for e in fb["current"] if e["kind"] == "finding"}
    outcomes = {o["code"]: o for o in fb["outcomes"]}
    current_outcome = next((e for e in reversed(fb["current"]) if e["kind"] == "outcome"), None)
    return _render(
        request,
        "study.html",
        session,
        d=detail,
        s=detail.summary,
        feedback=fb,
        verdicts=verdicts,
        outcomes=outcomes,
        current_outcome=current_outcome,
        may_give_feedback=session.user.role.at_least(Role(ctx.settings.feedback.min_role))
        and detail.summary.state != "purged"
        and bool(detail.results),
    )


@router.post("/studies/{study_id}/feedback")
async def give_feedback(study_id: StudyId, request: Request, session: Session = viewer) -> Response:
    """A radiologist's verdict on a finding (``kind=finding``, ``bundle_id``, ``label``, ``verdict``) or the
    study's confirmed outcome (``kind=outcome``, ``outcome_code``), from the study page's forms."""
    form = await request.form()

    def field(name: str) -> str | None:
        value = form.get(name)
        return value[:128] if isinstance(value, str) and value else None

    kind = field("kind") or ""
    try:
        rows = await run_in_threadpool(
            lambda: service.give_feedback(
                _ctx(request),
                request,
                session,
                str(study_id),
                kind=kind,
                bundle_id=field("bundle_id"),
                label=field("label"),
                verdict=field("verdict"),
                outcome_code=field("outcome_code"),
            )
        )
    except HTTPException as exc:
        refusals = {400: "feedback_invalid", 409: "feedback_closed", 503: "feedback_unavailable"}
        if exc.status_code not in refusals:
            raise
        return _back(f"/studies/{study_id}", refusals[exc.status_code])
    # the verdict in force, its revision and author show on the page itself
    return _back(f"/studies/{study_id}", "feedback_sent" if any(r.message_id for r in rows) else "feedback_kept")


def _png(root: FsPath, rel: str, what: str) -> Response:
    """The DICOM file at ``rel`` under ``root`` (a path from the database, never from the URL) as PNG: 404 for a
    path that leaves ``root``, 410 for a file gone or unreadable."""
    try:
        png = sc_to_png(resolve_under(root, rel))
    except UnsafePath:
        raise HTTPException(404, f"no {what} with that UID in this study") from None
    except (OSError, ValueError, pydicom.errors.InvalidDicomError) as exc:
        raise HTTPException(410, f"{what} file unavailable (purged or unreadable): {type(exc).__name__}") from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@router.get("/studies/{study_id}/overlays/{sop_uid}.png")
def overlay_png(study_id: StudyId, sop_uid: str, request: Request, session: Session = viewer) -> Response:
    """The SC result object ``sop_uid`` of this study as PNG; only files the read model lists, under the state dir."""
    ctx = _ctx(request)
    detail = service.study_detail_quiet(ctx, study_id)
    objects = [o for img in detail.images for o in img["objects"]] + list(detail.study_objects)
    match = [o for o in objects if o["sop_instance_uid"] == sop_uid and o["kind"] == "SC"]
    if not match:
        raise HTTPException(404, "no overlay image with that UID in this study")
    return _png(ctx.settings.state_dir, match[0]["path"], "overlay image")


@router.get("/studies/{study_id}/images/{sop_uid}.png")
def image_png(study_id: StudyId, sop_uid: str, request: Request, session: Session = viewer) -> Response:
    """The received image ``sop_uid`` of this study (the original the overlay is drawn on) as PNG, for the
    viewer's overlay on/off: only an instance the database holds for this study, from the spool directory."""
    ctx = _ctx(request)
    service.study_detail_quiet(ctx, study_id)  # 404 for an unknown study
    rows = ctx.store.query(
        "SELECT path FROM instances WHERE study_id=? AND sop_instance_uid=? ORDER BY id DESC LIMIT 1",
        (study_id, sop_uid),
    )
    if not rows:
        raise HTTPException(404, "no image with that UID in this study")
    return _png(ctx.settings.spool_dir, rows[0][0], "image")


@router.post("/studies/{study_id}/retry")
def retry(study_id: StudyId, request: Request, session: Session = technician) -> Response:
    try:
        service.retry(_ctx(request), session, str(study_id))
    except HTTPException as exc:
        if exc.status_code != 409:
            raise
        return _back(f"/studies/{study_id}", "retry_refused")
    return _back(f"/studies/{study_id}", "retry_done")


@router.post("/studies/{study_id}/resend")
def resend(study_id: StudyId, request: Request, session: Session = technician) -> Response:
    try:
        service.resend(_ctx(request), session, str(study_id))
    except HTTPException as exc:
        if exc.status_code != 409:
            raise
        return _back(f"/studies/{study_id}", "resend_refused")
    return _back(f"/studies/{study_id}", "resend_done")


# -- technician -----------------------------------------------------------------------------------------------------


def redacted_config(ctx: WebContext) -> str:
    """The effective configuration as JSON with every secret-looking value replaced by ``"<redacted>"``."""

    def scrub(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: scrub(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v, key) for v in value]
        lowered = key.lower()
        if value not in (None, "", {}) and any(s in lowered for s in SECRET_KEYS) and not lowered.endswith("_file"):
            return "<redacted>"
        return value

    doc = scrub(ctx.settings.model_dump(mode="json"))
    for section in ("engines", "cloud"):  # public keys are not secret, but key material is shown by id only
        for k in ("trusted_keys", "recipient_keys"):
            if isinstance(doc.get(section, {}).get(k), dict):
                doc[section][k] = {kid: "<public key>" for kid in doc[section][k]}
    return json.dumps(doc, indent=2, sort_keys=True)


def _technician(request: Request, session: Session, selftest: Any = None, **message: Any) -> Response:
    """The technician page, with a self-test report when one was just run, or a C-ECHO answer (``message``,
    ``message_is_error``: text the server made, never from the URL)."""
    ctx = _ctx(request)
    return _render(
        request,
        "technician.html",
        session,
        config=redacted_config(ctx),
        destinations=ctx.settings.pipeline.destinations,
        models=ctx.ports.models(),
        loaded=ctx.ports.engines(),
        log_hint=ctx.ports.log_hint,
        operating_points=ctx.ports.operating_points(),
        selftest=selftest,
        **message,
    )


@router.get("/technician")
def technician_page(request: Request, session: Session = technician) -> Response:
    return _technician(request, session)


@router.post("/technician/echo")
async def echo(request: Request, session: Session = technician) -> Response:
    form = await request.form()
    dest = form.get("destination")
    if not isinstance(dest, str) or not dest:
        raise HTTPException(400, "destination is required")
    ok, detail = await run_in_threadpool(service.echo, _ctx(request), request, session, dest)  # up to seconds
    # rendered here, not redirected: the answer's detail is the PACS's, and a URL may carry only a message key
    text = f"C-ECHO {dest}: {'OK' if ok else 'FAILED'}: {detail}"
    return _technician(request, session, message=text, message_is_error=not ok)


@router.post("/technician/selftest")
def run_selftest(request: Request, session: Session = technician) -> Response:
    return _technician(request, session, service.selftest(_ctx(request), request, session))


# -- audit and users ------------------------------------------------------------------------------------------------


@router.get("/audit")
def audit_page(
    request: Request,
    event: str | None = None,
    actor: str | None = None,
    since: str | None = None,
    until: str | None = None,
    session: Session = technician,
) -> Response:
    try:
        entries = audit.query(
            _ctx(request).store,
            event=event or None,
            actor=actor or None,
            since=since or None,
            until=until or None,
            limit=500,
        )
    except audit.AuditError as exc:
        raise HTTPException(400, str(exc)) from None
    filters = {"event": event or "", "actor": actor or "", "since": since or "", "until": until or ""}
    return _render(
        request, "audit.html", session, entries=entries, filters=filters, events=[e.value for e in AuditEvent]
    )


def _users(request: Request, session: Session, refusal: str = "", status: int = 200) -> Response:
    """The users page; ``refusal``: why the form just posted changed nothing (server-made text), shown in red."""
    users = accounts.list_users(_ctx(request).store)
    extra = {"message": refusal, "message_is_error": True} if refusal else {}
    page = _render(request, "users.html", session, users=users, roles=list(Role), **extra)
    page.status_code = status
    return page


@router.get("/users")
def users_page(request: Request, session: Session = admin) -> Response:
    return _users(request, session)


@router.post("/users")
async def users_add(request: Request, session: Session = admin) -> Response:
    ctx = _ctx(request)
    form = await request.form()
    name, role, password = (form.get(k) for k in ("username", "role", "password"))
    if not all(isinstance(v, str) and v for v in (name, role, password)):
        return _users(request, session, "User name, role and password are all required.", 400)
    assert isinstance(name, str) and isinstance(role, str) and isinstance(password, str)
    try:
        user = await run_in_threadpool(accounts.add_user, ctx.store, name, accounts.parse_role(role), password)
    except AccountError as exc:
        return _users(request, session, f"Not added: {exc}", 400)
    record_event(
        ctx.store,
        AuditEvent.USER_ADDED,
        actor=session.user.name,
        subject=user.name,
        detail={"role": user.role.value},
        source_ip=client_ip(request),
    )
    return _back("/users", "user_added")


@router.post("/users/{name}/{action}")
def users_change(name: str, action: str, request: Request, session: Session = admin) -> Response:
    if action not in ("disable", "enable", "unlock"):
        raise HTTPException(404, "unknown action")
    try:
        if action == "unlock":
            service.change_user(_ctx(request), request, session, name, None, None, None, unlock=True)
        else:
            service.change_user(_ctx(request), request, session, name, None, action == "disable", None)
    except AccountError as exc:
        return _users(request, session, f"Not changed: {exc}", 400)
    return _back("/users", "user_changed")
