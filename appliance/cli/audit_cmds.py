"""``appliance audit verify|list|export``: check, read and hand over the audit trail.

``verify`` exits 0 with "N entries, chain intact", or 1 naming each faulty entry (seq and what is wrong);
``list`` prints entries (``--json`` for machines); ``export --format dicom`` writes each entry as a DICOM
Audit Message (PS3.15 A.5), one XML document per line on stdout or one file per entry with ``--out``.
:func:`record_cli` is how the other commands record what a technician did (actor ``cli:<os user>``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from appliance.cli import settings_from
from appliance.cli.terminal import printable
from appliance.core import audit
from appliance.core.audit import AuditError, AuditEvent, cli_actor
from appliance.core.audit_dicom import to_dicom_audit_message
from appliance.core.config import Settings
from appliance.core.store import Store

audit_app = typer.Typer(help="The audit trail: verify its hash chain, list and export entries.", no_args_is_help=True)


def record_cli(
    settings: Settings,
    event: AuditEvent,
    subject: str | None = None,
    *,
    outcome: str = audit.SUCCESS,
    detail: Mapping[str, Any] | None = None,
) -> int:
    """Record a command-line action in the trail of ``settings``' state store; returns the entry's seq."""
    store = Store(settings.db_path)
    try:
        return audit.record_event(store, event, actor=cli_actor(), outcome=outcome, subject=subject, detail=detail)
    finally:
        store.close()


@audit_app.command("verify")
def verify_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Check every entry's hash and the chain; exit 1 naming each edited, deleted or missing entry."""
    store = Store(settings_from(ctx).db_path)
    faults = audit.verify(store)
    n = audit.count(store)
    if as_json:
        doc = {
            "entries": n,
            "intact": not faults,
            "faults": [{"seq": f.seq, "kind": f.kind, "message": f.message} for f in faults],
        }
        typer.echo(json.dumps(doc, indent=2))
    elif faults:
        for f in faults:
            typer.echo(str(f))
        typer.echo(f"{n} entries, {len(faults)} fault(s): chain NOT intact", err=True)
    else:
        typer.echo(f"{n} entries, chain intact")
    raise typer.Exit(1 if faults else 0)


def _select(
    ctx: typer.Context,
    since: str | None,
    until: str | None,
    event: str | None,
    actor: str | None,
    subject: str | None,
    limit: int,
) -> tuple[Settings, list[audit.AuditEntry]]:
    settings = settings_from(ctx)
    if event is not None and event not in {e.value for e in AuditEvent}:
        typer.echo(f"error: unknown event {event!r}; one of: {', '.join(e.value for e in AuditEvent)}", err=True)
        raise typer.Exit(2)
    try:
        rows = audit.query(
            Store(settings.db_path),
            since=since,
            until=until,
            event=event,
            actor=actor,
            subject=subject,
            limit=limit or None,
        )
    except AuditError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    rows.reverse()  # the newest ``limit`` entries, printed oldest first
    return settings, rows


_SINCE = typer.Option(None, "--since", help="from this UTC date/time on (ISO 8601, e.g. 2026-11-29 or ...T08:00Z)")
_UNTIL = typer.Option(None, "--until", help="before this UTC date/time (ISO 8601)")
_EVENT = typer.Option(None, "--event", help="only this event, e.g. login_failed")
_ACTOR = typer.Option(None, "--actor", help="only this actor, e.g. admin, system, cloud, cli:root")
_SUBJECT = typer.Option(None, "--subject", help="only this subject (study id, bundle id@version, user)")


@audit_app.command("list")
def list_cmd(
    ctx: typer.Context,
    since: str | None = _SINCE,
    until: str | None = _UNTIL,
    event: str | None = _EVENT,
    actor: str | None = _ACTOR,
    subject: str | None = _SUBJECT,
    limit: int = typer.Option(100, "--limit", min=0, help="the newest N matching entries (0 = all)"),
    as_json: bool = typer.Option(False, "--json", help="a JSON array of entries with every column"),
) -> None:
    """Entries matching the filters, oldest first."""
    _, rows = _select(ctx, since, until, event, actor, subject, limit)
    # Values can come from outside (a direct method's bundle id, a reason): JSON output is ASCII-only, and each
    # text line has its control characters and bidi overrides escaped (printable), so nothing in an entry can
    # move the cursor, erase the line above or fake another entry on the reader's terminal.
    if as_json:
        typer.echo(json.dumps([e.as_dict() for e in rows], indent=2, ensure_ascii=True))
        return
    if not rows:
        typer.echo("no audit entries")
    for e in rows:
        detail = json.dumps(e.detail, sort_keys=True, ensure_ascii=False) if e.detail else ""
        ip = f" from {e.source_ip}" if e.source_ip else ""
        line = f"{e.seq:>6} {e.time} {e.event:<18} {e.outcome:<7} {e.actor}{ip} {e.subject or '-'} {detail}"
        typer.echo(printable(line))


@audit_app.command("export")
def export_cmd(
    ctx: typer.Context,
    fmt: str = typer.Option("dicom", "--format", help="dicom: DICOM Audit Message XML (PS3.15 A.5); json"),
    out: Path | None = typer.Option(None, "--out", help="folder: one file per entry (audit-<seq>.xml/.json)"),
    since: str | None = _SINCE,
    until: str | None = _UNTIL,
    event: str | None = _EVENT,
    actor: str | None = _ACTOR,
    subject: str | None = _SUBJECT,
    limit: int = typer.Option(0, "--limit", min=0, help="the newest N matching entries (0 = all)"),
) -> None:
    """Each entry as one document: stdout gets one per line, ``--out DIR`` one file per entry."""
    if fmt not in ("dicom", "json"):
        typer.echo(f"error: --format must be dicom or json, got {fmt!r}", err=True)
        raise typer.Exit(2)
    settings, rows = _select(ctx, since, until, event, actor, subject, limit)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for e in rows:
        if fmt == "dicom":
            doc = to_dicom_audit_message(
                e,
                audit_source_id=settings.audit.source_id,
                enterprise_site_id=settings.audit.enterprise_site_id,
                ae_title=settings.dicom.ae_title,
            )
        else:
            doc = json.dumps(e.as_dict(), sort_keys=True, ensure_ascii=False)
        if out is None:
            typer.echo(doc)
        else:
            (out / f"audit-{e.seq:08d}.{'xml' if fmt == 'dicom' else 'json'}").write_text(doc + "\n", encoding="utf-8")
    if out is not None:
        typer.echo(f"{len(rows)} entries written to {out}", err=True)


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
