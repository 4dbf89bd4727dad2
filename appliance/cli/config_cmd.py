"""``appliance config check``: print the effective config and every problem."""

from __future__ import annotations

import json

import typer

from appliance.cli import settings_from
from appliance.core.config import check_problems

config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)


@config_app.command("check")
def check(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the effective configuration (file + environment) and every problem; exit 1 if any."""
    settings = settings_from(ctx)
    doc = json.loads(settings.model_dump_json())
    problems = check_problems(settings)
    if as_json:
        typer.echo(json.dumps({"config": doc, "problems": problems}, indent=2))
    else:
        typer.echo(json.dumps(doc, indent=2))
        for p in problems:
            typer.echo(f"problem: {p}", err=True)
        typer.echo("config OK" if not problems else f"{len(problems)} problem(s)", err=True)
    raise typer.Exit(1 if problems else 0)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
