"""The technician's ``appliance provision ...`` commands, plugged into the appliance's one command line.

Provisioning sits above the appliance (it may import it, never the reverse): the appliance's CLI finds
:func:`register` through the ``appliance.cli`` entry-point group declared in ``pyproject.toml``;
``python -m provisioning`` runs the same CLI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import tomli_w
import typer

from appliance.cli import settings_from
from appliance.cli.audit_cmds import record_cli
from appliance.cloud.sas import derive_device_key
from appliance.core.audit import FAILURE, AuditEvent
from appliance.core.config import ConfigError, config_path_from_env, load_settings
from durable import replace_durably, write_atomic
from provisioning.dps import GLOBAL_ENDPOINT, DpsError
from provisioning.dps import register as dps_register

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

provision_app = typer.Typer(help="Field technician: give this box its cloud identity.", no_args_is_help=True)


def _write_private(path: Path, text: str) -> None:
    """Write a secret 0600 (atomically; the directory 0700)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, text.encode("ascii"), mode=0o600)


def _update_config(path: Path, cloud: dict[str, object]) -> None:
    """Merge ``cloud`` into the TOML file's [cloud] table, keeping everything else; validated before writing."""
    doc = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    doc.setdefault("cloud", {}).update(cloud)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tomli_w.dumps(doc), encoding="utf-8")
    try:
        load_settings(tmp)  # never leave a config the appliance cannot start with
    except ConfigError:
        tmp.unlink()
        raise
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    replace_durably(tmp, path)


@provision_app.command("dps")
def dps(
    ctx: typer.Context,
    id_scope: str = typer.Option(..., help="DPS ID scope (0ne...)"),
    registration_id: str = typer.Option(..., help="this box's registration id"),
    symmetric_key: str | None = typer.Option(None, help="individual enrollment key (base64)"),
    group_key: str | None = typer.Option(None, help="enrollment group key (base64): the device key is derived"),
    cert: Path | None = typer.Option(None, help="X.509 client certificate (PEM), CN = registration id"),
    key: Path | None = typer.Option(None, help="its private key (PEM)"),
    endpoint: str = typer.Option(GLOBAL_ENDPOINT, help="DPS endpoint"),
    connect_host: str | None = typer.Option(None, help="address to dial instead of the endpoint (tests)"),
    port: int = typer.Option(8883),
    ca_file: Path | None = typer.Option(None, help="CA bundle (default: system store)"),
    timeout: float = typer.Option(120.0, help="give up after this many seconds"),
) -> None:
    """Register with DPS, then store the assigned hub and device id in the config and the key in secrets/."""
    config = Path(ctx.find_root().obj.config or config_path_from_env())
    if not config.exists():  # a new box: provisioning writes its first config file
        config.parent.mkdir(parents=True, exist_ok=True)
        config.touch(mode=0o640)
    settings = settings_from(ctx)
    if sum(x is not None for x in (symmetric_key, group_key, cert)) != 1:
        typer.echo("give exactly one of --symmetric-key, --group-key, --cert (with --key)", err=True)
        raise typer.Exit(2)
    device_key = derive_device_key(group_key, registration_id) if group_key else symmetric_key
    try:
        a = dps_register(
            id_scope=id_scope,
            registration_id=registration_id,
            symmetric_key=device_key,
            cert_file=str(cert) if cert else None,
            key_file=str(key) if key else None,
            ca_file=str(ca_file) if ca_file else None,
            host=endpoint,
            connect_host=connect_host,
            port=port,
            timeout_s=timeout,
        )
    except DpsError as exc:
        record_cli(
            settings,
            AuditEvent.PROVISIONING,
            registration_id,
            outcome=FAILURE,
            detail={"step": "dps", "error": str(exc)},
        )
        typer.echo(f"DPS registration failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    cloud: dict[str, object] = {"enabled": True, "hub_hostname": a.hub, "device_id": a.device_id}
    if device_key:
        _write_private(settings.secrets_dir / "device_key", device_key + "\n")
        cloud["auth"] = "sas"
    else:
        if cert is None:  # unreachable: exactly one of the three options was checked above
            raise typer.Exit(2)
        cloud.update(auth="x509", cert_file=str(cert.resolve()), key_file=str(key.resolve()) if key else None)
        cloud = {k: v for k, v in cloud.items() if v is not None}
    try:
        _update_config(config, cloud)
    except (ConfigError, OSError) as exc:
        record_cli(
            settings,
            AuditEvent.PROVISIONING,
            a.device_id,
            outcome=FAILURE,
            detail={"step": "config", "error": str(exc)},
        )
        typer.echo(f"assigned to {a.hub} as {a.device_id}, but the config could not be written: {exc}", err=True)
        raise typer.Exit(1) from exc
    record_cli(
        settings, AuditEvent.PROVISIONING, a.device_id, detail={"step": "dps", "hub": a.hub, "auth": cloud["auth"]}
    )
    typer.echo(f"assigned to {a.hub} as {a.device_id} ({a.substatus}); config {config} updated")


def register(app: typer.Typer) -> None:
    """Add ``provision`` to the appliance CLI (entry point ``appliance.cli: provisioning``)."""
    app.add_typer(provision_app, name="provision")
