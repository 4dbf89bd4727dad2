"""``appliance central ingest``: hub events (routed Avro files or JSON-lines exports) into the Parquet store.

fastavro, pyarrow and the store modules are imported inside the command only: the box never loads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from appliance.cli.central_cmds import _load_keys, central_app


def _sites(sites_csv: Path | None, hub_conn: str | None, hub_ca: Path | None) -> dict[str, Any]:
    from appliance.central.ingest import load_sites_csv, sites_from_twins

    if sites_csv is not None:
        try:
            return load_sites_csv(sites_csv)
        except (OSError, ValueError) as exc:
            typer.echo(f"--sites: {exc}", err=True)
            raise typer.Exit(2) from exc
    if not hub_conn:
        typer.echo(
            "no site dimension: give --hub-connection-string (twin tags) or --sites; site columns stay null", err=True
        )
        return {}
    from appliance.central.hub_service import ConnectionString, HubService, HubServiceError

    try:
        hub = HubService(ConnectionString.parse(hub_conn), ca_file=str(hub_ca) if hub_ca else None)
        # the real service also answers a projection (SELECT deviceId, tags); SELECT * is what every hub answers
        return sites_from_twins(hub.query("SELECT * FROM devices"))
    except ValueError as exc:
        typer.echo(f"--hub-connection-string: {exc}", err=True)
        raise typer.Exit(2) from exc
    except HubServiceError as exc:
        typer.echo(f"site dimension: {exc}", err=True)
        raise typer.Exit(1) from exc


def ingest_cmd(
    source: str = typer.Option(
        ..., "--from", help="container URL (https://<account>.blob.core.windows.net/<container>[?SAS]), folder or file"
    ),
    store: Path = typer.Option(..., "--to", help="the store folder (created with its _schema.json when new)"),
    key: list[Path] = typer.Option(..., "--key", help="<kid>.key file or a directory of them (repeatable)"),
    sites: Path | None = typer.Option(None, "--sites", help="offline site dimension: CSV device,site,region,..."),
    hub_conn: str | None = typer.Option(
        None,
        "--hub-connection-string",
        envvar="IOTHUB_CONNECTION_STRING",
        help="IoT Hub service connection string: the site dimension from the twins' tags",
    ),
    hub_ca: Path | None = typer.Option(None, "--ca-file", envvar="APPLIANCE_CENTRAL_CA_FILE", help="CA for the hub"),
    blob_conn: str | None = typer.Option(
        None,
        "--blob-connection-string",
        envvar="APPLIANCE_CENTRAL_BLOB_CONNECTION_STRING",
        help="storage connection string for a container URL without a SAS token",
    ),
    blob_ca: Path | None = typer.Option(None, "--blob-ca-file", envvar="APPLIANCE_CENTRAL_BLOB_CA_FILE"),
) -> None:
    """Stream hub events into the Parquet store: decrypt one at a time (sender = the hub's identity), drop
    duplicate message ids (also across runs), add the site dimension, write results/findings/stats/feedback
    partitioned by date and bundle. Refused events go to STORE/_rejects/<run>.jsonl with their reason.
    Prints a JSON summary; exit 1 when any event was refused (the rest is still stored), 2 when nothing could run."""
    from appliance.central import sources
    from appliance.central.ingest import Ingest, IngestError
    from appliance.central.store_schema import StoreSchemaError

    keys = _load_keys(key)
    if not keys:
        typer.echo("no private keys found", err=True)
        raise typer.Exit(2)
    site_dim = _sites(sites, hub_conn, hub_ca)
    if source.startswith(("https://", "http://")):
        try:
            client, prefix = sources.container_client(source, blob_conn, str(blob_ca) if blob_ca else None)
        except ValueError as exc:
            typer.echo(f"--from: {exc}", err=True)
            raise typer.Exit(2) from exc
        items = sources.read_container(client, prefix)
    else:
        path = Path(source)
        if not path.exists():
            typer.echo(f"--from: {source}: no such file or folder", err=True)
            raise typer.Exit(2)
        items = sources.read_path(path)
    try:
        with Ingest(store, keys, site_dim) as run:
            try:
                run.feed_all(items)
            except Exception as exc:  # e.g. the container became unreachable: roll back, say why
                from azure.core.exceptions import AzureError

                if not isinstance(exc, (AzureError, OSError)):
                    raise
                typer.echo(f"reading {source} failed, nothing stored: {exc}", err=True)
                raise typer.Exit(1) from exc
            summary = run.commit()
    except (StoreSchemaError, IngestError) as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(json.dumps(summary.as_dict(), sort_keys=True))
    if summary.rejected:
        typer.echo(f"{sum(summary.rejected.values())} event(s) refused: see {summary.rejects_file}", err=True)
    raise typer.Exit(1 if summary.rejected else 0)


def register(app: typer.Typer) -> None:
    """Add ``ingest`` to the ``central`` group."""
    central_app.command("ingest")(ingest_cmd)
