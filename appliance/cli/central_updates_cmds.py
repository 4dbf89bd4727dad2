"""``appliance central repo | rollout | status``: the central team's side of over-the-air model updates.

``repo init | publish | rotate-key | refresh | upload``: the TUF repository of model bundles in a local folder,
optionally uploaded to an Azure Blob Storage container; ``rollout``: set the director's desired
``model_updates`` on chosen device twins through the IoT Hub service API; ``status``: every device's update
state from its reported properties. Runbook: docs/UPDATES.md. These commands need no box config, except
``repo publish``, which verifies bundles with the trusted keys of ``--config`` (``[engines] trusted_keys``)
plus any ``--trusted-key`` file. Added to the ``central`` group of :mod:`appliance.cli.central_cmds`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from appliance.cli import settings_from
from appliance.cli.central_cmds import central_app
from appliance.updates import layout

T = TypeVar("T")
repo_app = typer.Typer(
    help="The TUF repository of model bundles (local folder, optionally Blob Storage).", no_args_is_help=True
)


# -- the TUF repository ----------------------------------------------------------------------------------------

_REPO = typer.Option(..., "--repo", envvar="APPLIANCE_CENTRAL_REPO", help="the repository's working folder")
_KEYS = typer.Option(
    ..., "--keys", envvar="APPLIANCE_CENTRAL_KEYS", help="folder of the TUF private keys (<role>/<keyid>.pem, 0600)"
)
_BLOB = typer.Option(
    None,
    "--blob-connection-string",
    envvar="APPLIANCE_CENTRAL_BLOB_CONNECTION_STRING",
    help="Azure Storage connection string: also upload the repository to Blob Storage",
)
_CONTAINER = typer.Option(layout.DEFAULT_CONTAINER, "--container", envvar="APPLIANCE_CENTRAL_CONTAINER")
_BLOB_CA = typer.Option(
    None, "--blob-ca-file", envvar="APPLIANCE_CENTRAL_BLOB_CA_FILE", help="CA bundle for the storage endpoint (tests)"
)
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([smhd])\Z")  # ASCII digits; \Z: no final newline


def _duration(text: str) -> dt.timedelta:
    from appliance.central.repository import MAX_EXPIRY

    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration like 90s, 30m, 12h or 7d")
    seconds = float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
    if not seconds <= MAX_EXPIRY.total_seconds():  # also inf, from a number too long for a float
        raise ValueError(f"{text!r}: at most {MAX_EXPIRY.days}d")
    return dt.timedelta(seconds=seconds)


def _role_map(items: list[str], what: str, parse: Callable[[str], T]) -> dict[str, T]:
    from appliance.central.repository import ROLES

    out: dict[str, T] = {}
    for item in items:
        role, sep, value = item.partition("=")
        if not sep or role not in ROLES:
            raise typer.BadParameter(f"{item!r}: expected ROLE={what} with ROLE one of {', '.join(ROLES)}")
        try:
            out[role] = parse(value)
        except ValueError as exc:
            raise typer.BadParameter(f"{item!r}: {exc}") from exc
    return out


def _refused(exc: Exception) -> typer.Exit:
    typer.echo(f"refused: {exc}", err=True)
    return typer.Exit(1)


def _upload(repo: Any, conn: str | None, container: str, ca_file: Path | None, public_read: bool = False) -> None:
    """Upload to Blob Storage when a connection string is given (creating the container if missing)."""
    if not conn:
        return
    from azure.core.exceptions import AzureError, ResourceExistsError
    from azure.storage.blob import BlobServiceClient

    from appliance.central.repository import upload

    kwargs: dict[str, Any] = {"connection_verify": str(ca_file)} if ca_file else {}
    try:
        service = BlobServiceClient.from_connection_string(conn, **kwargs)
        client = service.get_container_client(container)
        with contextlib.suppress(ResourceExistsError):
            client.create_container(public_access="blob" if public_read else None)
        written = upload(repo, client)
    except (AzureError, ValueError) as exc:
        typer.echo(f"upload to container {container!r} failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"uploaded": len(written), "container": container, "url": client.url}))


def _open(repo_dir: Path, keys_dir: Path | None) -> Any:
    from appliance.central.repository import Repository, RepositoryError

    try:
        return Repository(repo_dir, keys_dir)
    except RepositoryError as exc:
        raise _refused(exc) from exc


@repo_app.command("init")
def repo_init(
    repo: Path = _REPO,
    keys: Path = _KEYS,
    threshold: list[str] = typer.Option([], "--threshold", help="ROLE=N signatures needed (default 1; repeatable)"),
    key_count: list[str] = typer.Option([], "--key-count", help="ROLE=N keys made (default: its threshold)"),
    expiry: list[str] = typer.Option(
        [], "--expiry", help="ROLE=DURATION metadata lifetime, e.g. timestamp=1d (defaults: 365d/90d/7d/1d)"
    ),
    blob: str | None = _BLOB,
    container: str = _CONTAINER,
    blob_ca: Path | None = _BLOB_CA,
    public_read: bool = typer.Option(
        False, "--public-read", help="create the container with anonymous read of blobs (boxes read it without keys)"
    ),
) -> None:
    """Create an empty TUF repository and its keys; print the root a box must ship (metadata/1.root.json)."""
    from appliance.central import repository as R

    try:
        r = R.init(
            repo,
            keys,
            threshold=_role_map(threshold, "N", int),
            keys=_role_map(key_count, "N", int),
            expiry=_role_map(expiry, "DURATION", _duration),
        )
    except R.RepositoryError as exc:
        raise _refused(exc) from exc
    root = r.root().signed
    typer.echo(
        json.dumps(
            {
                "root": str(r.root_path()),
                "roles": {k: {"threshold": v.threshold, "keyids": v.keyids} for k, v in root.roles.items()},
            }
        )
    )
    _upload(r, blob, container, blob_ca, public_read)


@repo_app.command("publish")
def repo_publish(
    ctx: typer.Context,
    bundle: list[Path] = typer.Argument(..., help="signed bundle file(s), published in order"),
    repo: Path = _REPO,
    keys: Path = _KEYS,
    trusted_key: list[Path] = typer.Option(
        [], "--trusted-key", help="public key file (<key id> <base64>) of a bundle signer, besides the config's"
    ),
    blob: str | None = _BLOB,
    container: str = _CONTAINER,
    blob_ca: Path | None = _BLOB_CA,
) -> None:
    """Verify each bundle (its own signature and hashes) and add it as a TUF target; then upload if asked."""
    from appliance.central.repository import RepositoryError
    from appliance.models.active import trust_store
    from engines.errors import EnginesError
    from engines.keys import TrustStore, read_public_key_file

    r = _open(repo, keys)
    trust = trust_store(settings_from(ctx))
    try:
        extra = dict(read_public_key_file(p) for p in trusted_key)
        trust = TrustStore.from_config({**{k: _b64(v) for k, v in trust.keys.items()}, **extra}, trust.revoked)
    except (EnginesError, OSError) as exc:
        raise _refused(exc) from exc
    for b in bundle:
        try:
            pub = r.publish(b, trust)
        except (RepositoryError, OSError) as exc:
            raise _refused(exc) from exc
        typer.echo(
            json.dumps(
                {
                    "target": pub.target_path,
                    "sha256": pub.sha256,
                    "length": pub.length,
                    "signed_by": pub.verified.key_id,
                    "targets_version": pub.targets_version,
                }
            )
        )
    _upload(r, blob, container, blob_ca)


def _b64(pub: Any) -> str:
    from engines.keys import public_key_b64

    return public_key_b64(pub)


@repo_app.command("rotate-key")
def repo_rotate_key(
    role: str = typer.Argument(..., help="root, targets, snapshot or timestamp"),
    old_keyid: str | None = typer.Option(None, "--old-keyid", help="the key to replace (default: the role's only key)"),
    repo: Path = _REPO,
    keys: Path = _KEYS,
    blob: str | None = _BLOB,
    container: str = _CONTAINER,
    blob_ca: Path | None = _BLOB_CA,
) -> None:
    """Replace a role's key: a new root version signed by the old and new root keys; the role re-signed."""
    from appliance.central.repository import RepositoryError

    r = _open(repo, keys)
    try:
        new = r.rotate_key(role, old_keyid)
    except RepositoryError as exc:
        raise _refused(exc) from exc
    typer.echo(json.dumps({"role": role, "new_keyid": new, "root_version": r.root_version()}))
    _upload(r, blob, container, blob_ca)


@repo_app.command("refresh")
def repo_refresh(
    repo: Path = _REPO,
    keys: Path = _KEYS,
    blob: str | None = _BLOB,
    container: str = _CONTAINER,
    blob_ca: Path | None = _BLOB_CA,
) -> None:
    """Re-sign timestamp.json (and snapshot/targets past half their lifetime); run from cron, e.g. every 6 h."""
    from appliance.central.repository import RepositoryError

    r = _open(repo, keys)
    try:
        versions = r.refresh()
    except RepositoryError as exc:
        raise _refused(exc) from exc
    root_expires = r.root_expires()
    typer.echo(
        json.dumps(
            {
                "resigned": versions,
                "timestamp_expires": r.timestamp().signed.expires.isoformat(),
                "root_expires": root_expires.isoformat(),
            }
        )
    )
    if root_expires - dt.datetime.now(dt.timezone.utc) < dt.timedelta(days=60):
        typer.echo(f"warning: root metadata expires {root_expires:%Y-%m-%d}: rotate a root key before", err=True)
    _upload(r, blob, container, blob_ca)


@repo_app.command("upload")
def repo_upload(
    repo: Path = _REPO,
    blob: str = typer.Option(..., "--blob-connection-string", envvar="APPLIANCE_CENTRAL_BLOB_CONNECTION_STRING"),
    container: str = _CONTAINER,
    blob_ca: Path | None = _BLOB_CA,
    public_read: bool = typer.Option(False, "--public-read", help="create the container with anonymous blob read"),
) -> None:
    """Upload the repository to Blob Storage (new files only; timestamp.json last)."""
    _upload(_open(repo, None), blob, container, blob_ca, public_read)


# -- rollouts and status through the IoT Hub service API ----------------------------------------------------

_HUB = typer.Option(
    ...,
    "--connection-string",
    envvar="IOTHUB_CONNECTION_STRING",
    help="IoT Hub service connection string (HostName=..;SharedAccessKeyName=..;SharedAccessKey=..)",
)
_HUB_CA = typer.Option(None, "--ca-file", envvar="APPLIANCE_CENTRAL_CA_FILE", help="CA bundle for the hub (tests)")


def _hub(conn: str, ca_file: Path | None) -> Any:
    from appliance.central.hub_service import ConnectionString, HubService

    try:
        return HubService(ConnectionString.parse(conn), ca_file=str(ca_file) if ca_file else None)
    except ValueError as exc:
        typer.echo(f"--connection-string: {exc}", err=True)
        raise typer.Exit(2) from exc


def rollout_cmd(
    bundle: str = typer.Option(..., "--bundle", help="bundle id"),
    version: str = typer.Option(..., "--version", help="the version those devices should run"),
    device: list[str] = typer.Option([], "--device", help="device id (repeatable)"),
    query: str | None = typer.Option(
        None, "--query", help="twin query selecting devices, e.g. \"SELECT * FROM devices WHERE tags.clinic='x'\""
    ),
    window: str | None = typer.Option(None, "--window", help="maintenance window HH:MM-HH:MM, box local time"),
    any_time: bool = typer.Option(False, "--any-time", help="clear the maintenance window"),
    health_studies: int | None = typer.Option(None, "--health-studies", help="studies without error to pass"),
    health_deadline_s: float | None = typer.Option(None, "--health-deadline-s", help="else roll back after this"),
    repo: Path | None = typer.Option(
        None, "--repo", envvar="APPLIANCE_CENTRAL_REPO", help="refuse a version this repository has not published"
    ),
    conn: str = _HUB,
    ca_file: Path | None = _HUB_CA,
) -> None:
    """Set desired.model_updates on the chosen devices (twin PATCH with If-Match); each box then updates itself."""
    from appliance.central.rollout import director_patch

    if not device and not query:
        typer.echo("name devices with --device or select them with --query", err=True)
        raise typer.Exit(2)
    try:
        patch = director_patch(
            bundle,
            version,
            window=window,
            any_time=any_time,
            health_studies=health_studies,
            health_deadline_s=health_deadline_s,
        )
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    if repo is not None:
        r = _open(repo, None)
        if layout.target_path(bundle, version) not in r.targets().signed.targets:
            raise _refused(ValueError(f"{bundle} {version} is not published in {repo}"))
    patch_twins(conn, ca_file, device, query, patch)


def patch_twins(
    conn: str, ca_file: Path | None, device: list[str], query: str | None, patch: dict, *, err: bool = False
) -> None:
    """PATCH ``patch`` into the desired properties of the chosen devices (``--device`` ids or a twin ``--query``)
    and exit: one JSON line per device (on stderr with ``err``); exit 1 when a device failed or none matched."""
    from appliance.central.hub_service import HubServiceError
    from appliance.central.rollout import rollout, select_devices

    service = _hub(conn, ca_file)
    try:
        devices = select_devices(service, device, query)
    except HubServiceError as exc:
        raise _refused(exc) from exc
    if not devices:
        typer.echo("no device selected", err=True)
        raise typer.Exit(1)
    results = rollout(service, devices, patch)
    for res in results:
        line = {"device_id": res.device_id, "desired_version": res.desired_version, "error": res.error}
        typer.echo(json.dumps(line), err=err)
    raise typer.Exit(1 if any(r.error for r in results) else 0)


def status_cmd(
    query: str = typer.Option("SELECT * FROM devices", "--query", help="which devices (twin query)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per device and bundle"),
    conn: str = _HUB,
    ca_file: Path | None = _HUB_CA,
) -> None:
    """Every device's model update state per bundle, from its twin's reported properties."""
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from appliance.central.hub_service import HubServiceError
    from appliance.central.rollout import fleet_status

    try:
        rows = fleet_status(_hub(conn, ca_file), query)
    except HubServiceError as exc:
        raise _refused(exc) from exc
    if as_json:
        for row in rows:
            typer.echo(json.dumps(asdict(row)))
        return
    from appliance.cli.terminal import cell

    # every value comes from a device twin (reported: written by the device itself): shown literally, never
    # as console markup, with control characters escaped (cell)
    table = Table("device", "conn", "bundle", "desired", "state", "version", "active", "progress", "reason", "since")
    for row in rows:
        progress = "" if row.bytes is None else f"{row.bytes}/{row.total if row.total is not None else '?'}"
        table.add_row(
            cell(row.device_id),
            cell(row.connection),
            cell(row.bundle_id, "-"),
            cell(row.desired, "-"),
            cell(row.state, "-"),
            cell(row.version, "-"),
            cell(row.active_version, "-"),
            cell(progress),
            cell(row.reason),
            cell(row.since),
        )
    Console(emoji=False).print(table)


def register(app: typer.Typer) -> None:
    """Add ``repo``, ``rollout`` and ``status`` to the ``central`` group."""
    central_app.add_typer(repo_app, name="repo")
    central_app.command("rollout")(rollout_cmd)
    central_app.command("status")(status_cmd)
