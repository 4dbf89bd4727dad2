"""``appliance selftest``: the field technician's go/no-go check."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys

import typer
from rich.console import Console
from rich.table import Table

from appliance.app.selftest import run_selftest
from appliance.cli import settings_from
from appliance.cli.audit_cmds import record_cli
from appliance.core.audit import FAILURE, SUCCESS, AuditEvent
from appliance.core.logs import configure


def selftest(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json"),
    no_pacs: bool = typer.Option(False, "--no-pacs", help="skip the C-ECHO to each PACS destination"),
) -> None:
    """Check config, a PACS destination, cloud credentials (when cloud sync is on), disk, database, active models
    (golden check), the chain on phantoms and a C-ECHO to each PACS; exit 1 naming each failed step."""
    settings = settings_from(ctx)
    configure("WARNING", settings.log.format, sys.stderr)  # stdout carries the report
    report = run_selftest(settings, pacs=not no_pacs)
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    with contextlib.suppress(sqlite3.Error):  # a broken database is already in the report; it must still print
        record_cli(settings, AuditEvent.SELFTEST, outcome=FAILURE if failed else SUCCESS, detail={"failed": failed})
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        table = Table(title=f"self-test {'PASSED' if report['ok'] else 'FAILED'} at {report['at']}")
        for col in ("check", "result", "detail", "s"):
            table.add_column(col)
        for c in report["checks"]:
            table.add_row(c["name"], "ok" if c["ok"] else "[red]FAIL[/red]", c["detail"], f"{c['seconds']:.1f}")
        console = Console(highlight=False, emoji=False)
        console.print(table)
        failed = [c["name"] for c in report["checks"] if not c["ok"]]
        if failed:
            console.print(f"[red]FAILED: {', '.join(failed)}[/red]")
    raise typer.Exit(0 if report["ok"] else 1)


def register(app: typer.Typer) -> None:
    app.command("selftest")(selftest)
