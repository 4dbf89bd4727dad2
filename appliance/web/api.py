"""The JSON API, ``/api/v1``: the same data and actions as the pages, with the same roles.

Log in with ``POST /api/v1/session`` (``{"username", "password"}``): the answer sets the session cookie and
gives the ``csrf_token`` every later POST/DELETE sends as ``X-CSRF-Token``. Errors are ``{"detail": message}``
with 400/401/403/404/409/413/422/429 as usual; the schema is at ``/api/v1/openapi.json``.
"""

from __future__ import annotations

import datetime as dt
from datetime import date
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from appliance.core import audit
from appliance.core.audit import AuditEvent, record_event
from appliance.core.store import MAX_INTEGER
from appliance.lifecycle.studies import STUDY_STATES
from appliance.web import accounts, service
from appliance.web.accounts import AccountError, Role, Session
from appliance.web.app import WebContext
from appliance.web.security import SESSION_COOKIE, api_role, client_ip, cookie_args


class ErrorBody(BaseModel):
    """Every error answer: ``{"detail": message}`` (a 422 adds ``errors``, one line per invalid field)."""

    detail: str
    errors: list[str] | None = None


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# Errors any route may answer (declared on every operation so the schema states the real bodies).
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _err("not logged in, or the session expired"),
    403: _err("role too low, or a state-changing request without the session's X-CSRF-Token"),
    413: _err("request body over api.max_body_bytes"),
    422: _err("a parameter or the body is invalid: the field is named"),
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: _err("no such study (or user)")}
AMBIGUOUS: dict[int | str, dict[str, Any]] = {409: _err("the reference matches more than one study")}
BAD_REQUEST: dict[int | str, dict[str, Any]] = {400: _err("a filter or value the box refuses, with the reason")}

router = APIRouter(prefix="/api/v1", tags=["api"], responses=COMMON_ERRORS)

viewer = Depends(api_role(Role.VIEWER))
technician = Depends(api_role(Role.TECHNICIAN))
admin = Depends(api_role(Role.ADMIN))


def _ctx(request: Request) -> WebContext:
    return request.app.state.web  # type: ignore[no-any-return]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginRequest(Strict):
    """User name and password (``POST /api/v1/session``)."""

    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=accounts.MAX_PASSWORD_LENGTH)


class LoginAnswer(BaseModel):
    user: str
    role: str
    csrf_token: str
    expires_idle_s: float


class NewUser(Strict):
    username: str = Field(min_length=1, max_length=64, pattern=accounts.USER_NAME_PATTERN)
    role: Role
    password: str = Field(min_length=accounts.MIN_PASSWORD_LENGTH, max_length=accounts.MAX_PASSWORD_LENGTH)


class UserChange(Strict):
    # at least one change, each a value (an empty body or nulls only is a 400 "nothing to change": the schema
    # says so, so that a schema-valid request is never refused)
    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    role: Role | SkipJsonSchema[None] = None
    disabled: bool | SkipJsonSchema[None] = None
    unlock: Literal[True] | SkipJsonSchema[None] = Field(
        default=None, description="true clears the lock and the login delays of the user"
    )
    password: str | SkipJsonSchema[None] = Field(
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


@router.post(
    "/session",
    response_model=LoginAnswer,
    summary="Log in (sets the session cookie)",
    responses={
        401: _err("invalid user name or password (or the account is locked, or disabled)"),
        429: _err("too many failed logins from this address, or for this user from it (Retry-After)"),
    },
)
def login(body: LoginRequest, request: Request, response: Response) -> LoginAnswer:
    """Check the credentials and open a new session: the ``__Host-session`` cookie is set, and the answer gives
    the ``csrf_token`` that every later POST/PATCH/DELETE sends as ``X-CSRF-Token``."""
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
    """End the session (its cookie is deleted)."""
    service.logout(_ctx(request), request, session)
    out = Response(status_code=204)
    out.delete_cookie(SESSION_COOKIE, **{k: v for k, v in cookie_args().items() if k != "max_age"})
    return out


@router.get("/me", summary="Who is logged in")
def me(request: Request, session: Session = viewer) -> dict[str, Any]:
    """The logged-in user's name, role and the session's CSRF token."""
    return {"user": session.user.name, "role": session.user.role.value, "csrf_token": session.csrf_token}


@router.get("/studies", summary="The worklist", responses=BAD_REQUEST)
def studies(
    request: Request,
    since: date | None = Query(None, description="received on or after this day (YYYY-MM-DD, box local time)"),
    until: date | None = Query(None, description="received on or before this day"),
    state: str | None = Query(None, max_length=32, json_schema_extra={"enum": list(STUDY_STATES)}),
    finding: str | None = Query(None, max_length=64, description="a positive finding with this label"),
    urgent: bool = False,
    limit: int = Query(200, ge=1, le=1000),
    session: Session = viewer,
) -> list[dict[str, Any]]:
    """Studies matching the filters (each with its state, findings and whether one is urgent)."""
    rows = service.worklist(_ctx(request), since, until, state, finding, urgent, limit)
    return [r.to_dict() for r in rows]


@router.get(
    "/studies/{ref}",
    summary="One study: images, findings, result objects, timeline",
    responses={**NOT_FOUND, **AMBIGUOUS},
)
def study(ref: str, request: Request, session: Session = viewer) -> dict[str, Any]:
    """The study named by ``ref`` (its id, full Study Instance UID or a unique UID suffix); the view is audited."""
    ctx = _ctx(request)
    detail = service.study(ctx, request, session, ref)
    return detail.to_dict()


@router.post(
    "/studies/{ref}/retry",
    summary="Analyse the study again (technician)",
    responses={**NOT_FOUND, 409: _err("ambiguous reference, or the study cannot be retried in its state")},
)
def retry(ref: str, request: Request, session: Session = technician) -> dict[str, Any]:
    """Queue the study for analysis again; answers its new state."""
    return {"state": service.retry(_ctx(request), session, ref)}


@router.post(
    "/studies/{ref}/resend",
    summary="Send the study's results to the PACS again (technician)",
    responses={**NOT_FOUND, 409: _err("ambiguous reference, or the study has no results to send")},
)
def resend(ref: str, request: Request, session: Session = technician) -> dict[str, Any]:
    """Queue the study's result objects for the PACS destinations again; answers how many were queued."""
    return {"queued": service.resend(_ctx(request), session, ref)}


@router.get(
    "/studies/{ref}/feedback",
    response_model=StudyFeedbackOut,
    summary="The study's feedback",
    responses={**NOT_FOUND, **AMBIGUOUS},
)
def study_feedback(ref: str, request: Request, session: Session = viewer) -> dict[str, Any]:
    """Feedback in force, every revision, and the outcome codes the box offers."""
    return service.study_feedback(_ctx(request), ref)


@router.post(
    "/studies/{ref}/feedback",
    response_model=list[FeedbackOut],
    status_code=201,
    summary="Give feedback on a finding or record the study's confirmed outcome (viewer and above)",
    responses={
        400: _err("unknown label, verdict or outcome code"),
        403: _err("role below feedback.min_role, or no CSRF token"),
        404: _err("no such study"),
        409: _err("the study was purged by retention, has no result, or the reference is ambiguous"),
        503: _err("the feedback message could not be prepared for the central team"),
    },
)
def give_feedback(ref: str, body: FeedbackRequest, request: Request, session: Session = viewer) -> list[dict[str, Any]]:
    """Record a verdict on one finding or the study's confirmed outcome; answers the revisions recorded."""
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
    """The box at a glance: DICOM listener, PACS destinations, cloud, models, queues, disk, readiness."""
    return service.dashboard(_ctx(request))


@router.get("/models", summary="Installed model bundles and what is loaded")
def models(request: Request, session: Session = viewer) -> dict[str, Any]:
    """Loaded engines, installed bundles and the site operating points in force."""
    ctx = _ctx(request)
    return {
        "loaded": ctx.ports.engines(),
        "installed": ctx.ports.models(),
        "operating_points": ctx.ports.operating_points(),
    }


@router.get("/audit", summary="The audit trail, newest first", responses=BAD_REQUEST)
def audit_trail(
    request: Request,
    event: AuditEvent | None = Query(None),
    actor: str | None = Query(None, max_length=128),
    since: dt.datetime | None = Query(None, description="ISO 8601 date or date-time (naive = UTC), inclusive"),
    until: dt.datetime | None = Query(None, description="ISO 8601 date or date-time (naive = UTC), exclusive"),
    limit: int = Query(200, ge=1, le=5000),
    offset: int = Query(0, ge=0, le=MAX_INTEGER, description="entries to skip (paging, newest first)"),
    session: Session = technician,
) -> list[dict[str, Any]]:
    """Audit entries matching the filters, newest first (``offset`` pages back)."""
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
    """Every dashboard user with role, disabled and locked flags (never a password hash)."""
    return [u.as_dict() for u in accounts.list_users(_ctx(request).store)]


@router.post(
    "/users",
    status_code=201,
    summary="Add a user (admin)",
    responses={**BAD_REQUEST, 409: _err("a user of that name exists")},
)
def add_user(body: NewUser, request: Request, session: Session = admin) -> dict[str, Any]:
    """Create a user (name, role, password of at least 10 characters); recorded as ``user_added``."""
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


@router.patch(
    "/users/{name}",
    summary="Change a user's role, password or disabled flag, or unlock them (admin)",
    responses={**BAD_REQUEST, 404: _err("no such user")},
)
def change_user(name: str, body: UserChange, request: Request, session: Session = admin) -> dict[str, Any]:
    """Apply the given changes (``unlock: true`` clears the lock and the login delays); recorded as
    ``user_changed``. An admin cannot disable or demote themselves (400)."""
    ctx = _ctx(request)
    try:
        changed = service.change_user(
            ctx, request, session, name, body.role, body.disabled, body.password, unlock=bool(body.unlock)
        )
    except AccountError as exc:
        raise HTTPException(404 if str(exc).startswith("no user") else 400, str(exc)) from None
    return changed


@router.post("/echo", summary="C-ECHO a PACS destination (technician)", responses=NOT_FOUND)
def echo(body: EchoRequest, request: Request, session: Session = technician) -> dict[str, Any]:
    """Verify the association with a configured destination; ``ok`` false gives dcmtk's or the peer's reason."""
    ok, detail = service.echo(_ctx(request), request, session, body.destination)
    return {"destination": body.destination, "ok": ok, "detail": detail}


@router.post("/selftest", summary="Run the self-test (technician; takes tens of seconds)")
def selftest(request: Request, session: Session = technician) -> dict[str, Any]:
    """Run the self-test (phantoms through the loaded models, C-ECHO of each destination); recorded."""
    return service.selftest(_ctx(request), request, session)
