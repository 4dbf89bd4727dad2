"""What the API and the pages both do: log in and out, read the worklist, act on studies, check the box.

Each function raises ``HTTPException`` with the status and message the client should see, and records the
audit entries (login, failed login, lockout, logout, study viewed, user changes, C-ECHO and self-test; retry and
resend are recorded by :mod:`appliance.worklist.actions`).
"""

from __future__ import annotations

import math
import shutil
from datetime import date
from typing import Any

from fastapi import HTTPException, Request

from appliance.core import audit
from appliance.core.audit import FAILURE, SUCCESS, AuditEvent, record_event
from appliance.core.logs import get_logger
from appliance.core.store import now
from appliance.models import stats
from appliance.web import accounts
from appliance.web.accounts import AccountError, LoginOutcome, Role, Session
from appliance.web.app import WebContext, readiness
from appliance.web.security import SESSION_COOKIE, WebAuth, client_ip, throttle_key
from appliance.worklist import actions, feedback
from appliance.worklist.feedback import FeedbackEntry, FeedbackRefused
from appliance.worklist.read import (
    AmbiguousStudy,
    StudyDetail,
    StudyNotFound,
    StudySummary,
    find_study,
    list_studies,
    study_detail,
)

log = get_logger(__name__)

LOGIN_REFUSED = "invalid user name or password (or the account is locked)"


def known_address(ctx: WebContext, name: str, key: str) -> bool:
    """True when ``name`` logged in before from the address (IPv6: the /64) ``key`` of
    :func:`~appliance.web.security.throttle_key`, by the audit trail's last 500 ``login`` entries."""
    entries = audit.query(ctx.store, event=AuditEvent.LOGIN, actor=name, limit=500)
    return any(e.source_ip is not None and throttle_key(e.source_ip) == key for e in entries)


def login(ctx: WebContext, request: Request, name: str, password: str) -> tuple[str, Session]:
    """Check the credentials and open a new session (never the one the browser brought). 429 (with
    ``Retry-After``) when this address failed too often, or this user failed too often from this address
    (:class:`~appliance.web.security.LoginDelay`); 401 with one message for every refusal (unknown user, wrong
    password, locked, disabled: the audit trail tells them apart). A locked user still logs in from an address
    they used before, which clears the lock."""
    auth: WebAuth = request.app.state.auth
    ip = client_ip(request)
    key = throttle_key(ip)
    ticket = auth.limiter.begin(key)  # counted as a failure until it succeeds
    if ticket is None:
        record_event(
            ctx.store,
            AuditEvent.LOGIN_FAILED,
            actor="unknown",  # the typed name is not recorded: people type passwords there
            outcome=FAILURE,
            detail={"reason": "rate_limited"},
            source_ip=ip,
        )
        retry = str(math.ceil(ctx.settings.api.ip_window_s))
        raise HTTPException(
            429, "too many failed logins from this address: wait a few minutes", headers={"Retry-After": retry}
        )
    known = accounts.get_user(ctx.store, name)
    wait = auth.delay.begin(name, key)
    if wait > 0:
        record_event(
            ctx.store,
            AuditEvent.LOGIN_FAILED,
            actor=known.name if known is not None else "unknown",
            outcome=FAILURE,
            detail={"reason": "delayed", "wait_s": math.ceil(wait)},
            source_ip=ip,
        )
        raise HTTPException(
            429,
            f"too many failed logins for this user from this address: try again in {math.ceil(wait)} s",
            headers={"Retry-After": str(math.ceil(wait))},
        )
    was_locked = known is not None and known.locked_until is not None and known.locked_until > now()
    trusted = was_locked and known_address(ctx, name, key)
    outcome, user = accounts.authenticate(ctx.store, ctx.settings.api, name, password, known_address=trusted)
    if outcome is not LoginOutcome.OK or user is None:
        actor = user.name if user is not None else "unknown"
        detail = {"reason": outcome.value} if user is not None else {"reason": "unknown_user"}
        record_event(ctx.store, AuditEvent.LOGIN_FAILED, actor=actor, outcome=FAILURE, detail=detail, source_ip=ip)
        if outcome is LoginOutcome.LOCKED_NOW and user is not None:
            record_event(
                ctx.store,
                AuditEvent.LOCKOUT,
                actor="system",
                subject=user.name,
                detail={"attempts": ctx.settings.api.lockout_attempts, "locked_s": ctx.settings.api.lockout_s},
                source_ip=ip,
            )
            log.warning("user locked out", user=user.name)
        raise HTTPException(401, LOGIN_REFUSED)
    auth.limiter.succeeded(key, ticket)
    auth.delay.succeeded(name, key)
    accounts.purge_expired_sessions(ctx.store, ctx.settings.api)  # abandoned sessions do not pile up
    token, session = accounts.open_session(ctx.store, user, ip, replaces=request.cookies.get(SESSION_COOKIE))
    login_detail: dict[str, Any] = {"role": user.role.value}
    if was_locked:
        login_detail["cleared_lock"] = "known_address"
    record_event(ctx.store, AuditEvent.LOGIN, actor=user.name, detail=login_detail, source_ip=ip)
    return token, session


def logout(ctx: WebContext, request: Request, session: Session) -> None:
    """End the session and record it."""
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        accounts.close_session(ctx.store, token)
    record_event(ctx.store, AuditEvent.LOGOUT, actor=session.user.name, source_ip=client_ip(request))


def worklist(
    ctx: WebContext,
    since: date | None,
    until: date | None,
    state: str | None,
    finding: str | None,
    urgent: bool,
    limit: int = 200,
) -> list[StudySummary]:
    """The worklist rows for these filters (400 for a filter the read model refuses)."""
    try:
        return list_studies(
            ctx.store,
            since=since,
            until=until,
            state=state or None,
            finding=finding or None,
            urgent_only=urgent,
            limit=limit,
        )
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


def study_id(ctx: WebContext, ref: str) -> int:
    """The study id named by ``ref`` (id, full UID or unique UID suffix): 404 unknown, 409 ambiguous."""
    try:
        return find_study(ctx.store, ref)
    except StudyNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except AmbiguousStudy as exc:
        raise HTTPException(409, str(exc)) from None


def subject_of(summary: StudySummary) -> str:
    """How the audit trail names a study: its cloud pseudonym when it has one, else its row id (no PHI)."""
    return summary.pseudonym or f"study:{summary.id}"


def study(ctx: WebContext, request: Request, session: Session, ref: str) -> StudyDetail:
    """One study in full; records ``study_viewed``."""
    sid = study_id(ctx, ref)
    try:
        detail = study_detail(ctx.store, sid)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None
    record_event(
        ctx.store,
        AuditEvent.STUDY_VIEWED,
        actor=session.user.name,
        subject=subject_of(detail.summary),
        source_ip=client_ip(request),
    )
    return detail


def study_detail_quiet(ctx: WebContext, sid: int) -> StudyDetail:
    """One study in full without an audit entry (the overlay images of a page whose view was recorded)."""
    try:
        return study_detail(ctx.store, sid)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None


def retry(ctx: WebContext, session: Session, ref: str) -> str:
    """Reopen the study for analysis (409 with the reason when refused); returns its new state."""
    sid = study_id(ctx, ref)
    try:
        return actions.retry_analysis(ctx.store, ctx.settings, sid, actor=session.user.name)
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None


def resend(ctx: WebContext, session: Session, ref: str) -> int:
    """Queue the study's results for the PACS again (409 with the reason when refused); returns how many."""
    sid = study_id(ctx, ref)
    try:
        return actions.resend_to_pacs(ctx.store, ctx.settings, sid, actor=session.user.name)
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None


def echo(ctx: WebContext, request: Request, session: Session, destination: str) -> tuple[bool, str]:
    """C-ECHO one configured PACS destination (404 unknown name); recorded as a ``selftest`` entry."""
    names = [d.name for d in ctx.settings.pipeline.destinations]
    if destination not in names:
        raise HTTPException(404, f"no PACS destination {destination!r}; configured: {', '.join(names) or 'none'}")
    ok, detail = ctx.ports.echo(destination)
    record_event(
        ctx.store,
        AuditEvent.SELFTEST,
        actor=session.user.name,
        outcome=SUCCESS if ok else FAILURE,
        subject=f"pacs:{destination}",
        detail={"check": "c-echo", "ok": ok},
        source_ip=client_ip(request),
    )
    return ok, detail


def selftest(ctx: WebContext, request: Request, session: Session) -> dict[str, Any]:
    """Run the self-test and record its verdict."""
    report = ctx.ports.selftest()
    failed = [c["name"] for c in report.get("checks", []) if not c.get("ok")]
    record_event(
        ctx.store,
        AuditEvent.SELFTEST,
        actor=session.user.name,
        outcome=SUCCESS if report.get("ok") else FAILURE,
        detail={"failed": failed},
        source_ip=client_ip(request),
    )
    return report


def change_user(
    ctx: WebContext,
    request: Request,
    session: Session,
    name: str,
    role: Role | None,
    disabled: bool | None,
    password: str | None,
    unlock: bool = False,
) -> dict[str, Any]:
    """Apply an admin's change to a user (AccountError for a refused one) and record ``user_changed``.
    ``unlock`` clears the user's lock and every address's login delay for them (``detail.unlocked``)."""
    if accounts.get_user(ctx.store, name) is None:  # an unknown user is a 404 whatever the change
        raise AccountError(f"no user {name!r}")
    if name == session.user.name and (disabled or (role is not None and role is not Role.ADMIN)):
        raise AccountError("an admin cannot disable or demote themselves (ask another admin)")
    changes: dict[str, Any] = {}
    if role is not None:
        accounts.set_role(ctx.store, name, role)
        changes["role"] = role.value
    if disabled is not None:
        accounts.set_disabled(ctx.store, name, disabled)
        changes["disabled"] = disabled
    if password is not None:
        accounts.set_password(ctx.store, name, password)
        changes["password"] = "changed"
    if unlock:
        changes["unlocked"] = accounts.unlock(ctx.store, name)
        auth: WebAuth = request.app.state.auth
        auth.delay.clear_user(name)
    if not changes:
        raise AccountError("nothing to change: give role, disabled, password or unlock")
    record_event(
        ctx.store,
        AuditEvent.USER_CHANGED,
        actor=session.user.name,
        subject=name,
        detail=changes,
        source_ip=client_ip(request),
    )
    user = accounts.get_user(ctx.store, name)
    assert user is not None
    return user.as_dict()


def dashboard(ctx: WebContext) -> dict[str, Any]:
    """The box at a glance: listener, PACS destinations, cloud, models, queues, disk, readiness, and every PROBLEM
    ``appliance status`` lists (``problems``: ``[{"key", "message", "blocking"}]``, blocking first). ``ready`` is
    false while ``/readyz`` has a reason (``not_ready``) or a blocking problem exists."""
    services = ctx.ports.status_doc()
    q = ctx.store.query
    counts = ctx.store.state_counts()
    backlog = q("SELECT COUNT(*) FROM exports WHERE state != 'done'")[0][0]
    failing = {
        r["destination"]: {"pending": r["n"], "last_error": r["last_error"]}
        for r in q(
            "SELECT destination, COUNT(*) AS n, MAX(last_error) AS last_error FROM exports"
            " WHERE state != 'done' GROUP BY destination"
        )
    }
    last_done = {
        r["destination"]: r["t"]
        for r in q("SELECT destination, MAX(done_at) AS t FROM exports WHERE state='done' GROUP BY destination")
    }
    pacs = [
        {
            "name": d.name,
            "ae_title": d.ae_title,
            "host": d.host,
            "port": d.port,
            "pending": failing.get(d.name, {}).get("pending", 0),
            "last_error": failing.get(d.name, {}).get("last_error"),
            "last_success_at": last_done.get(d.name),
        }
        for d in ctx.settings.pipeline.destinations
    ]
    path = ctx.settings.state_dir
    usage = shutil.disk_usage(path)
    outbox = q("SELECT count, bytes FROM outbox_totals WHERE id=1")
    models = ctx.ports.engines()
    active = [(b["bundle_id"], b["version"]) for b in models.get("bundles_active", [])]
    found = ctx.ports.problems()
    return {
        "drift": stats.drift_alerts(ctx.store.conn, active),  # the banner: bundle versions that drifted
        "ready": (reasons := readiness(ctx)) == [] and not any(p["blocking"] for p in found),
        "not_ready": reasons,
        "problems": found,
        "listener": services.get("dicom-scp", {}),
        "listener_up": ctx.ports.listener_up(),
        "pacs": pacs,
        "cloud": ctx.ports.cloud(),
        "models": models,
        "studies": counts,
        "queues": {
            "assembling": counts.get("received", 0),
            "analysis": counts.get("complete", 0) + counts.get("inferring", 0),
            "export_backlog": backlog,
            "outbox": outbox[0][0] if outbox else 0,
        },
        "disk": {
            "free_bytes": usage.free,
            "total_bytes": usage.total,
            "floor_bytes": ctx.settings.dicom.min_free_bytes,
        },
    }


def give_feedback(
    ctx: WebContext,
    request: Request,
    session: Session,
    ref: str,
    *,
    kind: str,
    bundle_id: str | None = None,
    label: str | None = None,
    verdict: str | None = None,
    outcome_code: str | None = None,
) -> list[FeedbackEntry]:
    """Record a radiologist's feedback on the study (:func:`appliance.worklist.feedback.record`, which audits it
    and queues its de-identified message). 403 below ``[feedback] min_role``, 404 unknown study, 409 purged or no
    result, 400 an unknown verdict, label or outcome code, 503 when its message cannot be prepared; nothing is
    written on any of them."""
    minimum = Role(ctx.settings.feedback.min_role)
    if not session.user.role.at_least(minimum):
        raise HTTPException(403, f"feedback needs the {minimum.value} role (feedback.min_role)")
    sid = study_id(ctx, ref)
    try:
        return feedback.record(
            ctx.store,
            ctx.settings,
            sid,
            kind=kind,  # type: ignore[arg-type]  # checked by record: 400 for anything else
            actor=session.user.name,
            role=session.user.role.value,
            bundle_id=bundle_id,
            label=label,
            verdict=verdict,
            outcome_code=outcome_code,
            publisher=ctx.ports.feedback_publisher,
            source_ip=client_ip(request),
        )
    except StudyNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except FeedbackRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None
    except (ValueError, OSError) as exc:
        log.error("feedback message could not be prepared; nothing recorded", study_id=sid, error=str(exc)[:200])
        raise HTTPException(503, f"feedback could not be prepared for the central team: {exc}") from None


def study_feedback(ctx: WebContext, ref: str) -> dict[str, Any]:
    """The study's feedback: ``current`` (in force: the newest revision of each), ``history`` (every revision,
    oldest first) and the ``outcomes`` a radiologist may record (code, display, positive)."""
    sid = study_id(ctx, ref)
    return {
        "study_id": sid,
        "current": [e.to_dict() for e in feedback.current(ctx.store, sid)],
        "history": [e.to_dict() for e in feedback.history(ctx.store, sid)],
        "outcomes": [o.model_dump() for o in ctx.settings.feedback.outcomes],
    }
