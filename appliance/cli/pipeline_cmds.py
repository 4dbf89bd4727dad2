"""``appliance pacs echo``, ``appliance infer`` and ``appliance demo``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from appliance.cli import settings_from

pacs_app = typer.Typer(help="The clinic PACS destinations results are sent to.", no_args_is_help=True)


@pacs_app.command("echo")
def pacs_echo(
    ctx: typer.Context,
    name: str | None = typer.Argument(None, help="destination name (default: every configured destination)"),
    timeout: float = typer.Option(10.0, help="seconds per destination"),
) -> None:
    """C-ECHO the configured PACS destination(s); exit 1 if any fails."""
    from appliance.delivery.export import echo

    settings = settings_from(ctx)
    dests = settings.pipeline.destinations
    if name is not None:
        dests = [d for d in dests if d.name == name]
        if not dests:
            known = ", ".join(d.name for d in settings.pipeline.destinations) or "none configured"
            typer.echo(f"no destination named {name!r} (known: {known})", err=True)
            raise typer.Exit(2)
    if not dests:
        typer.echo("no PACS destinations configured (pipeline.destinations)", err=True)
        raise typer.Exit(2)
    failed = 0
    for dest in dests:
        ok, message = echo(settings, dest, timeout)
        typer.echo(("OK    " if ok else "FAIL  ") + message)
        failed += not ok
    raise typer.Exit(1 if failed else 0)


def infer_cmd(
    ctx: typer.Context,
    paths: list[Path] = typer.Argument(..., help="DICOM files or folders"),
    out: Path | None = typer.Option(None, "--out", help="write the SR and SC objects here"),
    as_json: bool = typer.Option(False, "--json", help="print the findings as JSON"),
    bundle: str | None = typer.Option(None, "--bundle", help="bundle id (default: every matching active bundle)"),
) -> None:
    """Run the pipeline offline on files or folders: findings table (or JSON), SR/SC to --out.

    Exit 0 when every file was analysed (or routed to no model), 1 when a file, study or result object failed
    (each reported, the rest still done) or nothing was found, 2 for a path that does not exist."""
    from appliance.app.infer_offline import run_offline

    settings = settings_from(ctx)
    try:
        report = run_offline(settings, paths, out, bundle)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if not report["studies"] and not report["errors"]:
        typer.echo(f"no files found in {', '.join(map(str, paths))}", err=True)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        from appliance.app.infer_offline import format_table

        typer.echo(format_table(report))
    raise typer.Exit(0 if report["studies"] and not report["errors"] else 1)


def register(app: typer.Typer) -> None:
    app.add_typer(pacs_app, name="pacs")
    app.command("infer")(infer_cmd)
