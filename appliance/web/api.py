"""The JSON API, ``/api/v1``: the same data and actions as the pages, with the same roles.

Log in with ``POST /api/v1/session`` (``{"username", "password"}``): the answer sets the session cookie and
gives the ``csrf_token`` every later POST/DELETE sends as ``X-CSRF-Token``. Errors are ``{"detail": message}``
with 400/401/403/404/409/413/422/429 as usual; the schema is at ``/api/v1/openapi.json``.
"""

from __future__ import annotations

from datetime import date
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from appliance.core import audit
from appliance.core.audit import AuditEvent, record_event
from appliance.core.store import MAX_INTEGER
from appliance.web import accounts, service
from appliance.web.accounts import AccountError, Role, Session
from appliance.web.app import WebContext
from appliance.web.security import SESSION_COOKIE, api_role, client_ip, cookie_args

router = APIRouter(prefix="/api/v1", tags=["api"])

viewer = Depends(api_role(Role.VIEWER))
technician = Depends(api_role(Role.TECHNICIAN))
admin = Depends(api_role(Role.ADMIN))


def _ctx(request: Request) -> WebContext:
    return request.app.state.web  # type: ignore[no-any-return]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginRequest(Strict):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=accounts.MAX_PASSWORD_LENGTH)


class LoginAnswer(BaseModel):
    user: str
    role: str
    csrf_token: str
    expires_idle_s: float


class NewUser(Strict):
    username: str = Field(min_length=1, max_length=64)
    role: Role
    password: str = Field(min_length=accounts.MIN_PASSWORD_LENGTH, max_length=accounts.MAX_PASSWORD_LENGTH)


class UserChange(Strict):
    role: Role | None = None
    disabled: bool | None = None
    password: str | None = Field(
        default=None, min_length=accounts.MIN_PASSWORD_LENGTH, max_length=accounts.MAX_PASSWORD_LENGTH
    )


class FeedbackRequest(Strict):
    """A verdict on one finding (``kind`` "finding": ``bundle_id``, ``label``, ``verdict``) or the study's
    confirmed outcome (``kind`` "outcome": ``outcome_code``, one of ``[feedback] outcomes``; ``bundle_id``
    narrows it to that bundle's result)."""

    kind: Literal["finding", "outcome"]
    bundle_id: str | None = Field(default=None, min_length=1, max_length=64)
    label: str | None = Field(default=None, min_length=1, max_length=64)
    verdict: Literal["agree", "disagree", "uncertain"] | None = None
    outcome_code: str | None = Field(default=None, min_length=1, max_length=64)


class FeedbackOut(BaseModel):
    """One recorded feedback revision (``given_at``: seconds since the epoch; ``message_id``: the de-identified
    ``feedback`` message queued for the central team, null when kept on the box only)."""

    id: int
    study_id: int
    bundle_id: str
    bundle_version: str
    kind: Literal["finding", "outcome"]
    label: str | None
    verdict: Literal["agree", "disagree", "uncertain"] | None
    outcome_code: str | None
    outcome_positive: bool | None
    revision: int
    actor: str
    role: str
    given_at: float
    message_id: str | None


class OutcomeOut(BaseModel):
    code: str
    display: str
    positive: bool


class StudyFeedbackOut(BaseModel):
    """The feedback in force (newest revision of each finding verdict and outcome), every revision, and the
    outcome codes this box offers."""

    study_id: int
    current: list[FeedbackOut]
    history: list[FeedbackOut]
    outcomes: list[OutcomeOut]


class EchoRequest(Strict):
    destination: str = Field(min_length=1, max_length=128)


@router.post("/session", response_model=LoginAnswer, summary="Log in (sets the session cookie)")
def login(body: LoginRequest, request: Request, response: Response) -> LoginAnswer:
    ctx = _ctx(request)
    token, session = service.login(ctx, request, body.username, body.password)
    response.set_cookie(SESSION_COOKIE, token, **cookie_args())
    return LoginAnswer(
        user=session.user.name,
        role=session.user.role.value,
        csrf_token=session.csrf_token,
        expires_idle_s=ctx.settings.api.session_ttl_s,
    )


@router.delete("/session", summary="Log out", status_code=204)
def logout(request: Request, response: Response, session: Session = viewer) -> Response:
    service.logout(_ctx(request), request, session)
    out = Response(status_code=204)
    out.delete_cookie(SESSION_COOKIE, **{k: v for k, v in cookie_args().items() if k != "max_age"})
    return out


@router.get("/me", summary="Who is logged in")
def me(request: Request, session: Session = viewer) -> dict[str, Any]:
    return {"user": session.user.name, "role": session.user.role.value, "csrf_token": session.csrf_token}


@router.get("/studies", summary="The worklist, newest first")
def studies(
    request: Request,
    since: date | None = Query(None, description="received on or after this day (YYYY-MM-DD, box local time)"),
    until: date | None = Query(None, description="received on or before this day"),
    state: str | None = Query(None, max_length=32),
    finding: str | None = Query(None, max_length=64, description="a positive finding with this label"),
    urgent: bool = False,
    limit: int = Query(200, ge=1, le=1000),
    session: Session = viewer,
) -> list[dict[str, Any]]:
    rows = service.worklist(_ctx(request), since, until, state, finding, urgent, limit)
    return [r.to_dict() for r in rows]


@router.get("/studies/{ref}", summary="One study: images, findings, result objects, timeline")
def study(ref: str, request: Request, session: Session = viewer) -> dict[str, Any]:
    ctx = _ctx(request)
    detail = service.study(ctx, request, session, ref)
    return detail.to_dict()


@router.post("/studies/{ref}/retry", summary="Analyse the study again (technician)")
def retry(ref: str, request: Request, session: Session = technician) -> dict[str, Any]:
    return {"state": service.retry(_ctx(request), session, ref)}


@router.post("/studies/{ref}/resend", summary="Send the study's results to the PACS again (technician)")
def resend(ref: str, request: Request, session: Session = technician) -> dict[str, Any]:
    return {"queued": service.resend(_ctx(request), session, ref)}


@router.get("/studies/{ref}/feedback", response_model=StudyFeedbackOut, summary="The study's feedback")
def study_feedback(ref: str, request: Request, session: Session = viewer) -> dict[str, Any]:
    return service.study_feedback(_ctx(request), ref)


@router.post(
    "/studies/{ref}/feedback",
    response_model=list[FeedbackOut],
    status_code=201,
    summary="Give feedback on a finding or record the study's confirmed outcome (viewer and above)",
    responses={
        400: {"description": "unknown label, verdict or outcome code"},
        403: {"description": "role below feedback.min_role, or no CSRF token"},
        404: {"description": "no such study"},
        409: {"description": "the study was purged by retention, or has no result"},
    },
)
def give_feedback(ref: str, body: FeedbackRequest, request: Request, session: Session = viewer) -> list[dict[str, Any]]:
    rows = service.give_feedback(
        _ctx(request),
        request,
        session,
        ref,
        kind=body.kind,
        bundle_id=body.bundle_id,
        label=body.label,
        verdict=body.verdict,
        outcome_code=body.outcome_code,
    )
    return [r.to_dict() for r in rows]


@router.get("/status", summary="The box: listener, PACS, cloud, models, queues, disk")
def status(request: Request, session: Session = viewer) -> dict[str, Any]:
    return service.dashboard(_ctx(request))


@router.get("/models", summary="Installed model bundles and what is loaded")
def models(request: Request, session: Session = viewer) -> dict[str, Any]:
    ctx = _ctx(request)
    return {
        "loaded": ctx.ports.engines(),
        "installed": ctx.ports.models(),
        "operating_points": ctx.ports.operating_points(),
    }


@router.get("/audit", summary="The audit trail, newest first")
def audit_trail(
    request: Request,
    event: str | None = Query(None, max_length=64),
    actor: str | None = Query(None, max_length=128),
    since: str | None = Query(None, max_length=40, description="ISO 8601 date or time (UTC)"),
    until: str | None = Query(None, max_length=40),
    limit: int = Query(200, ge=1, le=5000),
    offset: int = Query(0, ge=0, le=MAX_INTEGER, description="entries to skip (paging, newest first)"),
    session: Session = technician,
) -> list[dict[str, Any]]:
    try:
        entries = audit.query(
            _ctx(request).store,
            event=event or None,
            actor=actor or None,
            since=since or None,
            until=until or None,
            limit=limit,
            offset=offset,
        )
    except audit.AuditError as exc:
        raise HTTPException(400, str(exc)) from None
    return [e.as_dict() for e in entries]


@router.get("/users", summary="Dashboard users (admin)")
def users(request: Request, session: Session = admin) -> list[dict[str, Any]]:
    return [u.as_dict() for u in accounts.list_users(_ctx(request).store)]


@router.post("/users", status_code=201, summary="Add a user (admin)")
def add_user(body: NewUser, request: Request, session: Session = admin) -> dict[str, Any]:
    ctx = _ctx(request)
    try:
        user = accounts.add_user(ctx.store, body.username, body.role, body.password)
    except AccountError as exc:
        raise HTTPException(409 if "exists" in str(exc) else 400, str(exc)) from None
    record_event(
        ctx.store,
        AuditEvent.USER_ADDED,
        actor=session.user.name,
        subject=user.name,
        detail={"role": user.role.value},
        source_ip=client_ip(request),
    )
    return user.as_dict()


@router.patch("/users/{name}", summary="Change a user's role, password or disabled flag (admin)")
def change_user(name: str, body: UserChange, request: Request, session: Session = admin) -> dict[str, Any]:
    ctx = _ctx(request)
    try:
        changed = service.change_user(ctx, request, session, name, body.role, body.disabled, body.password)
    except AccountError as exc:
        raise HTTPException(404 if str(exc).startswith("no user") else 400, str(exc)) from None
    return changed


@router.post("/echo", summary="C-ECHO a PACS destination (technician)")
def echo(body: EchoRequest, request: Request, session: Session = technician) -> dict[str, Any]:
    ok, detail = service.echo(_ctx(request), request, session, body.destination)
    return {"destination": body.destination, "ok": ok, "detail": detail}


@router.post("/selftest", summary="Run the self-test (technician; takes tens of seconds)")
def selftest(request: Request, session: Session = technician) -> dict[str, Any]:
    return service.selftest(_ctx(request), request, session)
