"""``appliance cloud ...``: run the cloud agent alone, and inspect its state (status, outbox)."""

from __future__ import annotations

import json
import signal
import threading

import typer

from appliance.cli import settings_from
from appliance.core.logs import configure

cloud_app = typer.Typer(help="Cloud sync with Azure IoT Hub (see docs/CLOUD.md).", no_args_is_help=True)


@cloud_app.command("run")
def run(ctx: typer.Context) -> None:
    """Run only the cloud agent in the foreground until SIGTERM/SIGINT (diagnostics; the daemon runs it too)."""
    settings = settings_from(ctx)
    configure(settings.log.level, settings.log.format)
    from appliance.cloud.agent import CloudAgent

    if not settings.cloud.device_id or not settings.cloud.hub_hostname:
        typer.echo("cloud.device_id and cloud.hub_hostname must be set", err=True)
        raise typer.Exit(2)
    agent = CloudAgent(settings)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    agent.start()
    done.wait()
    agent.stop()


@cloud_app.command("status")
def status(ctx: typer.Context) -> None:
    """Outbox depth by kind, recent sends/evictions and the last desired-properties decision (JSON)."""
    settings = settings_from(ctx)
    from appliance.cloud import outbox
    from appliance.cloud.client import credential_problems
    from appliance.core.store import Store

    store = Store(settings.db_path)
    count, size = outbox.depth(store.conn)
    rows = store.query("SELECT key, value FROM cloud_state WHERE key IN ('twin.desired_version','twin.desired_status')")
    problems = credential_problems(settings)
    doc = {
        "device_id": settings.cloud.device_id,
        "hub": settings.cloud.hub_hostname,
        "enabled": settings.cloud.enabled,
        "outbox": {"depth": count, "bytes": size, "by_kind": outbox.counts_by_kind(store.conn)},
        "twin": {r["key"]: json.loads(r["value"]) for r in rows},
        "credential_problems": problems,
    }
    typer.echo(json.dumps(doc, indent=2))
    for problem in problems:
        typer.echo(f"problem: {problem}", err=True)


@cloud_app.command("outbox")
def outbox_cmd(ctx: typer.Context, limit: int = typer.Option(20, help="rows to show")) -> None:
    """The next messages to send and the latest outcomes (sent / expired / evicted)."""
    settings = settings_from(ctx)
    from appliance.cloud import outbox
    from appliance.core.store import Store

    store = Store(settings.db_path)
    pending = [
        {"seq": r.seq, "message_id": r.message_id, "kind": r.kind, "priority": r.priority, "bytes": len(r.body)}
        for r in outbox.peek(store.conn, limit)
    ]
    typer.echo(json.dumps({"pending": pending, "recent": outbox.recent_log(store.conn, limit)}, indent=2))


@cloud_app.command("pseudonym")
def pseudonym(ctx: typer.Context, uid: str = typer.Argument(..., help="a Study/Series/SOP Instance UID")) -> None:
    """The pseudonym this box sends for a UID (to find a study the central team asks about)."""
    settings = settings_from(ctx)
    from appliance.cloud.deid import load_or_create_device_secret, pseudonym_uid

    typer.echo(pseudonym_uid(load_or_create_device_secret(settings.secrets_dir), uid))


def register(app: typer.Typer) -> None:
    app.add_typer(cloud_app, name="cloud")
