"""``appliance purge``: apply the retention policy now (the daemon also does it every hour)."""

from __future__ import annotations

import json

import typer

from appliance.cli import settings_from
from appliance.core.audit import cli_actor
from appliance.core.store import Store
from appliance.retention.purge import due_studies, purge_due


def purge(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="only list the study revisions that are due"),
) -> None:
    """Delete received files and results of studies settled longer than retention.days."""
    settings = settings_from(ctx)
    store = Store(settings.db_path)
    if dry_run:
        due = due_studies(store, settings.retention.days)
        typer.echo(json.dumps({"due": due, "retention_days": settings.retention.days}))
        return
    done = purge_due(settings, store, actor=cli_actor())
    typer.echo(json.dumps({"purged": done, "retention_days": settings.retention.days}))


def register(app: typer.Typer) -> None:
    app.command("purge")(purge)
