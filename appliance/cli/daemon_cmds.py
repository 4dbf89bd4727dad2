"""``appliance run``, ``appliance status`` and ``appliance studies``."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from appliance.cli import settings_from
from appliance.cloud.client import credential_problems
from appliance.core.config import Settings
from appliance.delivery.export import undeliverable
from appliance.lifecycle.studies import STUDY_STATES


def run(ctx: typer.Context) -> None:
    """Run the appliance in the foreground (logs to stdout); SIGTERM/SIGINT stop it cleanly."""
    settings = settings_from(ctx)
    from appliance.app.daemon import run as run_daemon  # keep `status` & co. light

    raise typer.Exit(run_daemon(settings))


def _readonly_db(settings: Settings) -> sqlite3.Connection | None:
    """The state database opened read-only (never created or migrated by a look-only command)."""
    if not settings.db_path.exists():
        return None
    conn = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


def _disk(path: Path) -> dict[str, int]:
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return {"free_bytes": usage.free, "total_bytes": usage.total}


def status_doc(settings: Settings) -> dict[str, Any]:
    from appliance.app.daemon import read_status

    running = read_status(settings)
    counts = {s: 0 for s in STUDY_STATES}
    instances = 0
    alert: dict[str, Any] = {"count": 0, "oldest_age_s": None}
    conn = _readonly_db(settings)
    if conn is not None:
        try:
            for r in conn.execute("SELECT state, COUNT(*) AS n FROM studies GROUP BY state"):
                counts[r["state"]] = r["n"]
            instances = conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
            alert = undeliverable(conn, settings.retention.export_alert_hours * 3600)
        except sqlite3.OperationalError:  # database exists but was never migrated
            pass
        finally:
            conn.close()
    scp = (running or {}).get("services", {}).get("dicom-scp") or {}
    d = settings.dicom
    return {
        "running": running is not None,
        "pid": running.get("pid") if running else None,
        "started_at": running.get("started_at") if running else None,
        "dicom": {
            "ae_title": scp.get("ae_title", d.ae_title),
            "host": scp.get("host", d.bind),
            "port": scp.get("port", d.port),
            "listening": bool(scp),
        },
        "state_dir": str(settings.state_dir),
        "disk": {**_disk(settings.state_dir), "min_free_bytes": d.min_free_bytes},
        "studies": counts,
        "instances": instances,
        "exports_undeliverable": alert,  # given up, or pending over retention.export_alert_hours
        "cloud": {
            "enabled": settings.cloud.enabled,
            "problems": credential_problems(settings) if settings.cloud.enabled else [],
        },
    }


def status(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="machine-readable")) -> None:
    """Is the daemon running, where it listens, studies per state, free disk."""
    doc = status_doc(settings_from(ctx))
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    console = Console()
    dicom = doc["dicom"]
    where = f"{dicom['ae_title']}@{dicom['host']}:{dicom['port']}"
    if doc["running"]:
        console.print(f"[green]running[/green] (pid {doc['pid']}), DICOM listening on {where}")
    else:
        console.print(f"[yellow]not running[/yellow]; DICOM would listen on {where}")
    disk = doc["disk"]
    low = disk["free_bytes"] < disk["min_free_bytes"]
    console.print(
        f"disk: {disk['free_bytes'] / 1e9:.1f} GB free of {disk['total_bytes'] / 1e9:.1f} GB"
        + (" [red](below dicom.min_free_bytes: new instances refused)[/red]" if low else "")
    )
    for problem in doc["cloud"]["problems"]:
        console.print(f"[red]cloud: {problem}[/red]", soft_wrap=True)
    alert = doc["exports_undeliverable"]
    if alert["count"]:
        console.print(
            f"[red]{alert['count']} export(s) undeliverable[/red], oldest queued "
            f"{alert['oldest_age_s'] / 3600:.1f} h ago (see `appliance studies`; given up after "
            "retention.undeliverable_days)"
        )
    table = Table("state", "studies", title=f"studies in {doc['state_dir']} ({doc['instances']} instances)")
    for state, n in doc["studies"].items():
        table.add_row(state, str(n))
    console.print(table)


def studies(
    ctx: typer.Context,
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="how many, newest first"),
    state: str | None = typer.Option(None, "--state", help="only studies in this state"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable"),
) -> None:
    """Recent studies (one row per revision) with their states."""
    settings = settings_from(ctx)
    if state is not None and state not in STUDY_STATES:
        typer.echo(f"unknown state {state!r}; one of: {', '.join(STUDY_STATES)}", err=True)
        raise typer.Exit(2)
    rows: list[dict[str, Any]] = []
    conn = _readonly_db(settings)
    if conn is not None:
        try:
            sql = (
                "SELECT s.id, s.study_uid, s.revision, s.state, s.detail, s.modality, s.calling_ae, s.created_at,"
                " s.updated_at, s.completed_at, (SELECT COUNT(*) FROM instances i WHERE i.study_id=s.id) AS instances"
                " FROM studies s"
            )
            params: tuple = ()
            if state:
                sql += " WHERE s.state=?"
                params = (state,)
            sql += " ORDER BY s.updated_at DESC, s.id DESC LIMIT ?"
            rows = [dict(r) for r in conn.execute(sql, (*params, limit))]
        except sqlite3.OperationalError:
            rows = []
        finally:
            conn.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("id", "study UID", "rev", "state", "modality", "inst", "from", "updated", "detail")
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["study_uid"],
            str(r["revision"]),
            r["state"],
            r["modality"] or "",
            str(r["instances"]),
            r["calling_ae"] or "",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["updated_at"])),
            r["detail"] or "",
        )
    Console().print(table if rows else "no studies")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("status")(status)
    app.command("studies")(studies)
