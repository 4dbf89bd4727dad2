"""``appliance central report``: the central team's report over the results store (DuckDB, or Spark)."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import typer

from appliance.cli.central_cmds import central_app


def _date(value: str | None, option: str) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is not a date YYYY-MM-DD", param_hint=option) from exc


def report_cmd(
    store: Path = typer.Option(..., "--store", help="the results store folder (written by `central ingest`)"),
    site: str | None = typer.Option(None, "--site", help="only this site (the twin tag `site`)"),
    since: str | None = typer.Option(None, "--since", help="first UTC day, YYYY-MM-DD (inclusive)"),
    until: str | None = typer.Option(None, "--until", help="last UTC day, YYYY-MM-DD (inclusive)"),
    bundle: list[Path] = typer.Option(
        [],
        "--bundle",
        help="bundle file, or a folder of them (e.g. the TUF repository's targets): its manifest's "
        "`reference` is what drift is measured against (repeatable)",
    ),  # fmt: skip
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON (docs/CENTRAL.md gives its shape)"),
    html: Path | None = typer.Option(None, "--html", help="write a self-contained HTML report (plots inline) here"),
    engine: str = typer.Option("duckdb", "--engine", help="duckdb (in this process) or spark (pip extra `spark`)"),
    spark_master: str = typer.Option("local[2]", "--spark-master", help="with --engine spark: the Spark master"),
) -> None:
    """Per site x bundle version x ISO week: volume, score quantiles, positive rates, drift (PSI) against the
    bundle's reference and the rest of the fleet, refusals by reason, concordance with radiologists' feedback; and
    per site and label a calibration table (sensitivity, specificity, PPV, NPV, referral rate at thresholds 0.05 ..
    0.95) to choose an operating point from. Exit 2 for an unusable store or reference."""
    from appliance.central.report import Filters, ReportError, build_report, references_from_bundles, to_json

    filters = Filters(site=site, since=_date(since, "--since"), until=_date(until, "--until"))
    if filters.since and filters.until and filters.since > filters.until:
        raise typer.BadParameter("--since is after --until", param_hint="--since")
    if engine not in ("duckdb", "spark"):
        raise typer.BadParameter("duckdb or spark", param_hint="--engine")
    try:
        references = references_from_bundles(bundle)
        if engine == "spark":
            from appliance.central.spark_job import SparkEngine

            with SparkEngine.session(spark_master) as spark_engine:
                report = build_report(spark_engine, store, filters, references)
        else:
            from appliance.central.report_engine import DuckDBEngine

            duck = DuckDBEngine()
            try:
                report = build_report(duck, store, filters, references)
            finally:
                duck.close()
    except ReportError as exc:
        typer.echo(f"report: {exc}", err=True)
        raise typer.Exit(2) from exc
    if html is not None:
        from appliance.central.report_html import render_html

        html.write_text(render_html(report), encoding="utf-8")
        typer.echo(f"report written to {html}", err=True)
    if as_json:
        sys.stdout.write(to_json(report) + "\n")
    elif html is None:
        from appliance.central.report import summary

        typer.echo(summary(report))


def register(app: typer.Typer) -> None:
    """Add ``report`` to the ``central`` group."""
    central_app.command("report")(report_cmd)
