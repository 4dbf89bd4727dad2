"""``appliance run`` and ``appliance status`` (``appliance studies`` and ``appliance study``: ``study_cmds``)."""

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


def _queues(conn: sqlite3.Connection) -> dict[str, Any]:
    """Export backlog and cloud outbox depth from the database (zeros before their tables exist)."""
    doc: dict[str, Any] = {
        "exports": {"pending": 0, "failing": 0, "oldest_pending_at": None, "last_error": None},
        "outbox": {"depth": 0, "bytes": 0},
    }
    try:
        r = conn.execute(
            "SELECT COUNT(*) AS n, COALESCE(SUM(attempts > 0), 0) AS failing, MIN(created_at) AS oldest"
            " FROM exports WHERE state='pending'"
        ).fetchone()
        err = conn.execute(
            "SELECT last_error FROM exports WHERE state='pending' AND last_error IS NOT NULL ORDER BY id DESC LIMIT 1"
        ).fetchone()
        doc["exports"] = {
            "pending": int(r["n"]),
            "failing": int(r["failing"]),
            "oldest_pending_at": r["oldest"],
            "last_error": err["last_error"] if err else None,
        }
        o = conn.execute("SELECT count, bytes FROM outbox_totals WHERE id=1").fetchone()
        if o is not None:
            doc["outbox"] = {"depth": int(o["count"]), "bytes": int(o["bytes"])}
    except sqlite3.OperationalError:  # not migrated yet
        pass
    return doc


def status_doc(settings: Settings) -> dict[str, Any]:
    """What ``appliance status`` shows, as a dict: daemon, DICOM listener, cloud connection (from the running
    daemon's ``status.json``), export backlog, outbox depth, disk, studies per state and the problems
    (``appliance.app.readiness``; ``blocking`` ones make ``appliance selftest`` fail)."""
    from appliance.app import readiness
    from appliance.app.daemon import read_status

    running = read_status(settings)
    counts = {s: 0 for s in STUDY_STATES}
    instances = 0
    queues: dict[str, Any] = {
        "exports": {"pending": 0, "failing": 0, "oldest_pending_at": None, "last_error": None},
        "outbox": {"depth": 0, "bytes": 0},
    }
    alert: dict[str, Any] = {"count": 0, "oldest_age_s": None}
    conn = _readonly_db(settings)
    try:
        if conn is not None:
            try:
                for r in conn.execute("SELECT state, COUNT(*) AS n FROM studies GROUP BY state"):
                    counts[r["state"]] = r["n"]
                instances = conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
                alert = undeliverable(conn, settings.retention.export_alert_hours * 3600)
            except sqlite3.OperationalError:  # database exists but was never migrated
                pass
            queues = _queues(conn)
        problems = readiness.problems(settings, conn)
    finally:
        if conn is not None:
            conn.close()
    services = (running or {}).get("services", {})
    scp = services.get("dicom-scp") or {}
    web_doc = services.get("web") or {}
    cloud_doc = services.get("cloud") or {}
    d, c = settings.dicom, settings.cloud
    cloud: dict[str, Any] = {
        "enabled": c.enabled,
        "hub": c.hub_hostname or None,
        "device_id": c.device_id or None,
        "problems": credential_problems(settings) if c.enabled else [],
    }
    if c.enabled:
        cloud.update(
            connected=bool(cloud_doc.get("connected")) if running else None,  # None: the daemon is not running
            last_error=cloud_doc.get("last_error"),
            connects=cloud_doc.get("connects"),
            as_of=running.get("updated_at", running.get("started_at")) if running else None,
        )
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
        "web": {
            "enabled": settings.api.enabled,
            "bind": settings.api.bind,
            "port": settings.api.port,
            "url": web_doc.get("url"),  # None while the daemon is not running (or the dashboard is off)
            "certificate_sha256": web_doc.get("certificate_sha256"),
            "self_signed": web_doc.get("self_signed"),
        },
        "cloud": cloud,
        **queues,
        "state_dir": str(settings.state_dir),
        "disk": {**_disk(settings.state_dir), "min_free_bytes": d.min_free_bytes},
        "studies": counts,
        "instances": instances,
        "problems": [{"key": p.key, "message": p.message, "blocking": p.blocking} for p in problems],
        "exports_undeliverable": alert,  # given up, or pending over retention.export_alert_hours
    }


def _ago(ts: float | None) -> str:
    if ts is None:
        return ""
    s = max(0.0, time.time() - ts)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def status(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="machine-readable")) -> None:
    """Is the box running and healthy: DICOM listener, cloud connection, export backlog, outbox, disk,
    studies per state, and PROBLEMS (no PACS destination, demo key trusted, missing device key, ...)."""
    doc = status_doc(settings_from(ctx))
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    console = Console(highlight=False, emoji=False)
    dicom = doc["dicom"]
    where = f"{dicom['ae_title']}@{dicom['host']}:{dicom['port']}"
    if doc["running"]:
        console.print(f"[green]running[/green] (pid {doc['pid']}), DICOM listening on {where}")
    else:
        console.print(f"[yellow]not running[/yellow]; DICOM would listen on {where}")
    web = doc["web"]
    if not web["enabled"]:
        console.print("dashboard: off (api.enabled = false)")
    elif web["url"]:
        cert = " (self-signed certificate, SHA-256 " if web["self_signed"] else " (certificate SHA-256 "
        console.print(f"dashboard: {web['url']}{cert}{web['certificate_sha256']})")
    elif doc["running"]:
        console.print("[red]dashboard: not serving[/red] (api.enabled = true; see the daemon's log)")
    else:
        console.print(f"dashboard: not running; would serve HTTPS on {web['bind']}:{web['port']}")
    cloud = doc["cloud"]
    if not cloud["enabled"]:
        console.print("cloud: off (cloud.enabled = false)")
    elif cloud["connected"] is None:
        console.print(f"cloud: {cloud['device_id']} @ {cloud['hub']}: unknown (the appliance is not running)")
    elif cloud["connected"]:
        console.print(f"cloud: [green]connected[/green] as {cloud['device_id']} to {cloud['hub']}")
    else:
        why = f" (last error: {cloud['last_error']})" if cloud.get("last_error") else ""
        console.print(f"cloud: [red]not connected[/red] as {cloud['device_id']} to {cloud['hub']}{why}")
    ex = doc["exports"]
    if ex["pending"]:
        failing = f", {ex['failing']} failing (last error: {ex['last_error']})" if ex["failing"] else ""
        console.print(f"exports to PACS: {ex['pending']} pending, oldest {_ago(ex['oldest_pending_at'])}{failing}")
    else:
        console.print("exports to PACS: none pending")
    ob = doc["outbox"]
    console.print(f"cloud outbox: {ob['depth']} message(s), {ob['bytes'] / 1e6:.1f} MB")
    disk = doc["disk"]
    low = disk["free_bytes"] < disk["min_free_bytes"]
    console.print(
        f"disk: {disk['free_bytes'] / 1e9:.1f} GB free of {disk['total_bytes'] / 1e9:.1f} GB"
        + (" [red](below dicom.min_free_bytes: new instances refused)[/red]" if low else "")
    )
    alert = doc["exports_undeliverable"]
    if alert["count"]:
        console.print(
            f"[red]{alert['count']} export(s) undeliverable[/red], oldest queued "
            f"{alert['oldest_age_s'] / 3600:.1f} h ago (see `appliance studies`; given up after "
            "retention.undeliverable_days)"
        )
    console.print(f"studies in {doc['state_dir']} ({doc['instances']} instances):")  # a title would wrap
    table = Table("state", "studies")
    for state, n in doc["studies"].items():
        table.add_row(state, str(n))
    console.print(table)
    if doc["problems"]:
        legend = "([red]![/red] the box cannot do its job; [yellow]-[/yellow] fix soon)"
        console.print(f"[bold red]PROBLEMS[/bold red] {legend}")
        for p in doc["problems"]:
            mark = "[red]![/red]" if p["blocking"] else "[yellow]-[/yellow]"
            console.print(f" {mark} {p['key']}: {p['message']}")
    else:
        console.print("no problems")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("status")(status)
