"""``appliance studies`` (the worklist) and ``appliance study show|retry|resend REF``: what people at the clinic
and the technician do with studies from a shell, through the worklist read model and actions
(``appliance.worklist``), the same ones the dashboard uses.

``REF`` is the study's numeric id (first column of ``appliance studies``), its Study Instance UID, or the end of
its UID that only it has (as ``appliance studies`` shows it, ``…1234.5678``). Retry and resend work while the
appliance runs: the worker and the exporter pick the change up from the database (``pipeline.poll_s``).
"""

from __future__ import annotations

import getpass
import json
import os
import sqlite3
import time
from datetime import date, datetime
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from appliance.cli import settings_from
from appliance.core.config import Settings
from appliance.core.store import Store
from appliance.lifecycle.studies import NOT_ANALYSED, STUDY_STATES
from appliance.worklist.display import dicom_date, person_name
from appliance.worklist.read import Finding

SHORT_UID = 10  # characters of a Study Instance UID shown at 80 columns (its end: where UIDs differ)
WIDE_AT = 140  # console width from which the detail column is shown without --wide


def actor() -> str:
    """``cli:<os user>``: who ran the command, for the audit trail."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (a container)
        return f"cli:uid{os.getuid()}"


def open_store(settings: Settings, *, read_only: bool = False) -> Store | None:
    """The state store, or None when this box has none yet (nothing received; never created by a look).
    ``read_only``: for commands that only look (nothing created, migrated or written)."""
    if not settings.db_path.exists():
        return None
    return Store(settings.db_path, read_only=read_only)


def short_uid(uid: str) -> str:
    """The end of a UID, which is where the UIDs of one site differ: ``…4.5.1234.5678``."""
    return uid if len(uid) <= SHORT_UID else "…" + uid[-(SHORT_UID - 1) :]


def _when(ts: float) -> str:
    t = time.localtime(ts)
    return time.strftime("%H:%M" if time.strftime("%Y%m%d", t) == time.strftime("%Y%m%d") else "%m-%d %H:%M", t)


def _findings(findings: list[Finding]) -> Text:
    """Positive findings as they read per side ("L breast: mass 0.46 (CC, MLO)"), urgent ones first and in red;
    "-" when none is positive."""
    shown = [f for f in findings if f["positive"]]
    if not shown:
        return Text("-" if findings else "")
    out = Text()
    for i, f in enumerate(shown):
        if i:
            out.append(", ")
        label = "; ".join(f.get("text") or [f"{f['label']} {f['score']:.2f}"])  # per side, as it reads
        out.append(("URGENT " + label) if f["urgent"] else label, style="bold red" if f["urgent"] else "")
    return out


def _parse_day(value: datetime | None) -> date | None:
    return value.date() if value is not None else None


def studies(
    ctx: typer.Context,
    since: datetime | None = typer.Option(
        None, "--since", formats=["%Y-%m-%d"], metavar="YYYY-MM-DD", help="received on or after DATE"
    ),
    until: datetime | None = typer.Option(
        None, "--until", formats=["%Y-%m-%d"], metavar="YYYY-MM-DD", help="received on or before DATE"
    ),
    today: bool = typer.Option(False, "--today", help="received today"),
    state: str | None = typer.Option(None, "--state", help=f"one of: {', '.join(STUDY_STATES)}"),
    finding: str | None = typer.Option(None, "--finding", help="only studies with this positive finding (label)"),
    urgent: bool = typer.Option(False, "--urgent", help="only studies with an urgent finding"),
    wide: bool = typer.Option(False, "--wide", "-w", help="full Study Instance UIDs, pseudonyms and details"),
    limit: int = typer.Option(50, "--limit", "-n", min=1, help="how many, newest first"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable (every field, full UIDs)"),
) -> None:
    """The worklist: studies urgent first, then newest, with patient, accession, state and positive findings
    per side (urgent in red)."""
    from appliance.worklist.read import list_studies

    settings = settings_from(ctx)
    if today and (since or until):
        typer.echo("--today cannot be combined with --since/--until", err=True)
        raise typer.Exit(2)
    first, last = (date.today(), date.today()) if today else (_parse_day(since), _parse_day(until))
    store = open_store(settings, read_only=True)
    try:
        rows = (
            list_studies(store, since=first, until=last, state=state, finding=finding, urgent_only=urgent, limit=limit)
            if store is not None
            else []
        )
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    except sqlite3.OperationalError as exc:  # a database older than this software, not migrated yet
        typer.echo(f"cannot read {settings.db_path}: {exc} (start the appliance once to migrate it)", err=True)
        raise typer.Exit(1) from exc
    finally:
        if store is not None:
            store.close()
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2, ensure_ascii=False))
        return
    # --wide promises every column whole (the UID, the pseudonym): lines longer than the terminal, never cut
    console = Console(highlight=False, emoji=False, width=4000 if wide else None)
    if not rows:
        console.print("no studies")
        return
    detail = wide or console.width >= WIDE_AT
    narrow = not wide and console.width < 100
    table = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 1), collapse_padding=True)
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("received", no_wrap=True)
    table.add_column("patient ID, name", overflow="ellipsis", no_wrap=not wide, max_width=None if wide else 18)
    table.add_column("accession", overflow="ellipsis", no_wrap=True, max_width=None if wide else 10)
    if not narrow:
        table.add_column("mod", no_wrap=True)
    table.add_column("state", no_wrap=True, overflow="ellipsis")
    table.add_column("findings", overflow="fold", ratio=1, min_width=14)
    table.add_column("study UID" if wide else "study", no_wrap=True, overflow="fold" if wide else "ellipsis")
    if wide:
        table.add_column("pseudonym (cloud)", overflow="fold")
        table.add_column("images", justify="right")
    if detail:
        table.add_column("detail", overflow="fold")
    for r in rows:
        # the ID first: it survives a cut. Values from DICOM are Text, never rich markup: a "[/]" in a name
        # would stop the listing, a "[x]" would vanish
        who = " ".join(x for x in (r.patient_id, person_name(r.patient_name)) if x) or "-"
        cells: list[Any] = [
            Text(str(r.id), style="bold red" if r.urgent else ""),
            _when(r.received_at),
            Text(who),
            Text(r.accession_number or "-"),
            *([] if narrow else [Text(r.modality or "")]),
            r.state + (f" r{r.revision}" if r.revision > 1 else ""),
            Text(r.detail or "AI not applied", style="bold red") if r.state == NOT_ANALYSED else _findings(r.findings),
            r.study_uid if wide else short_uid(r.study_uid),
        ]
        if wide:
            cells += [r.pseudonym or "-", str(r.images)]
        if detail:
            cells.append(Text(r.detail or ""))
        table.add_row(*cells)
    console.print(table)


study_app = typer.Typer(help="One study: show it, analyse it again, send its results again.", no_args_is_help=True)


def _resolve(store: Store, ref: str) -> int:
    from appliance.worklist.read import find_study

    try:
        return find_study(store, ref)
    except LookupError as exc:
        typer.echo(str(exc.args[0] if exc.args else exc), err=True)
        raise typer.Exit(1) from exc


def _store_or_exit(settings: Settings) -> Store:
    store = open_store(settings)
    if store is None:
        typer.echo(f"no studies yet (no database in {settings.state_dir})", err=True)
        raise typer.Exit(1)
    return store


def _iso(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@study_app.command("show")
def show(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="id, Study Instance UID, or its unique end"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable"),
) -> None:
    """A study in full: patient, findings per image, result objects and the timeline of what the box did."""
    from appliance.core.audit import AuditEvent, record_event
    from appliance.worklist import feedback
    from appliance.worklist.read import study_detail

    store = _store_or_exit(settings_from(ctx))
    try:
        study_id = _resolve(store, ref)
        d = study_detail(store, study_id)
        given = feedback.history(store, study_id)
        in_force = {e.id for e in feedback.current(store, study_id)}
        record_event(store, AuditEvent.STUDY_VIEWED, actor=actor(), subject=f"study:{study_id}")
    finally:
        store.close()
    if as_json:
        doc = d.to_dict()
        doc["feedback"] = [{**e.to_dict(), "in_force": e.id in in_force} for e in given]
        typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    s = d.summary
    console = Console(highlight=False, emoji=False)
    head = Text(f"study {s.id}", style="bold")
    if s.urgent:
        head.append("  URGENT", style="bold red")
    console.print(head)
    lines = [
        ("Study Instance UID", f"{s.study_uid} (revision {s.revision})"),
        ("patient", " / ".join(x for x in (person_name(s.patient_name), s.patient_id) if x) or "-"),
        ("accession", s.accession_number or "-"),
        ("study date", dicom_date(s.study_date) or "-"),
        ("modality", f"{s.modality or '-'} from {s.calling_ae or '-'}, {s.images} image(s)"),
        ("received", _iso(s.received_at)),
        ("state", s.state + (f": {s.detail}" if s.detail else "")),
        ("cloud pseudonym", s.pseudonym or "-"),
        ("exports pending", str(d.export_pending)),
    ]
    for k, v in lines:
        console.print(f"  {k:<19} {v}", markup=False)
    if s.findings:
        t = Table("bundle", "finding", "score", "threshold", "positive", "urgent", title="findings (study)")
        for f in s.findings:
            t.add_row(
                Text(f["bundle_id"]),
                Text("; ".join(f.get("text") or [f["label"]])),
                f"{f['score']:.3f}",
                "" if f["threshold"] is None else f"{f['threshold']:.3f}",
                "yes" if f["positive"] else "no",
                Text("URGENT", style="bold red") if f["urgent"] else "",
            )
        console.print(t)
    if d.images:
        t = Table("image (SOP Instance UID)", "side/view", "findings", "result objects", title="images")
        for img in d.images:
            found = ", ".join(f"{x['label']} {x['score']:.2f}{' +' if x['positive'] else ''}" for x in img["findings"])
            refused = "; ".join(f"AI not applied ({x['bundle_id']}): {x['reason']}" for x in img["not_applied"])
            found = "; ".join(x for x in (found, refused) if x)
            objs = ", ".join(f"{o['kind']} {'sent' if o['exported'] else 'not sent'}" for o in img["objects"])
            side = " ".join(x for x in (img["laterality"], img["view"]) if x)
            t.add_row(img["sop_instance_uid"], Text(side), Text(found), objs)
        console.print(t)
    for o in d.study_objects:
        sent = "sent" if o["exported"] else "not sent"
        console.print(f"  {o['kind']} {o['sop_instance_uid']} ({sent}): {o['path']}", markup=False)
    for p in d.problems:
        console.print(Text("  ").append("problem:", style="yellow").append(f" {p}"))
    if given:
        t = Table("given", "by", "bundle", "feedback", "revision", "in force", "sent", title="radiologists' feedback")
        for fb in given:
            what = f"{fb.label}: {fb.verdict}" if fb.kind == "finding" else f"outcome {fb.outcome_code}"
            t.add_row(
                _iso(fb.given_at),
                Text(f"{fb.actor} ({fb.role})"),
                Text(f"{fb.bundle_id} {fb.bundle_version}"),
                Text(what),
                str(fb.revision),
                "yes" if fb.id in in_force else "",
                "yes" if fb.message_id else "no",
            )
        console.print(t)
    t = Table("at", "what", "detail", title="timeline")
    for e in d.timeline:
        t.add_row(_iso(e["at"]), e["what"], Text(e["detail"] or ""))
    console.print(t)


@study_app.command("retry")
def retry(ctx: typer.Context, ref: str = typer.Argument(..., help="id, Study Instance UID, or its unique end")) -> None:
    """Analyse the study again (an analysed, failed or no-model study; the running appliance picks it up)."""
    from appliance.worklist.actions import Refused, retry_analysis

    settings = settings_from(ctx)
    store = _store_or_exit(settings)
    try:
        study_id = _resolve(store, ref)
        state = retry_analysis(store, settings, study_id, actor=actor())
    except Refused as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    finally:
        store.close()
    typer.echo(f"study {study_id} is {state}: it will be analysed again")


@study_app.command("resend")
def resend(
    ctx: typer.Context, ref: str = typer.Argument(..., help="id, Study Instance UID, or its unique end")
) -> None:
    """Send the study's results (SR and SCs) to every PACS destination again."""
    from appliance.worklist.actions import Refused, resend_to_pacs

    settings = settings_from(ctx)
    store = _store_or_exit(settings)
    try:
        study_id = _resolve(store, ref)
        n = resend_to_pacs(store, settings, study_id, actor=actor())
    except Refused as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    finally:
        store.close()
    dests = ", ".join(d.name for d in settings.pipeline.destinations)
    typer.echo(f"study {study_id}: {n} result object(s) queued for {dests}")


def register(app: typer.Typer) -> None:
    app.command("studies")(studies)
    app.add_typer(study_app, name="study")
