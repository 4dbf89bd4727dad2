"""``appliance central operating-point sign``: a site's thresholds for one bundle, signed for the twin.

The central team picks a site's operating point from its calibration table (``central report``), signs it with
the same Ed25519 key it signs recipient key sets with (``central keyset keygen``; the boxes trust it through
``cloud.keyset_trusted_keys``) and either prints the twin patch or, with ``--apply``, PATCHes the twins of the
chosen devices through the IoT Hub service API, as ``central rollout`` does.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import typer

from appliance.cli.central_cmds import central_app
from appliance.cli.central_updates_cmds import _HUB_CA, patch_twins

op_app = typer.Typer(
    help="Site operating points: per-site thresholds signed by the central team.", no_args_is_help=True
)


def _threshold(spec: str) -> tuple[str, float]:
    label, sep, value = spec.rpartition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not label or not math.isfinite(number):
        raise typer.BadParameter(f"{spec!r}: expected LABEL=THRESHOLD, e.g. nodule=0.4")
    return label, number


@op_app.command("sign")
def sign_cmd(
    key: Path = typer.Option(..., "--key", help="the central signing key (PEM, from `central keyset keygen`)"),
    bundle: str = typer.Option(..., "--bundle", help="bundle id, e.g. cxr-phantom"),
    site: str = typer.Option(..., "--site", help="the site this operating point is for (twin tag site)"),
    threshold: list[str] = typer.Option(..., "--threshold", help="LABEL=THRESHOLD (repeatable)"),
    version: int | None = typer.Option(
        None, "--version", min=1, help="above every operating point of this bundle signed before (default: now, s)"
    ),
    out: Path | None = typer.Option(None, "--out", help="write the twin patch here (default: stdout)"),
    apply: bool = typer.Option(False, "--apply", help="PATCH the twins of --device / --query now"),
    device: list[str] = typer.Option([], "--device", help="with --apply: device id (repeatable)"),
    query: str | None = typer.Option(
        None, "--query", help="with --apply: twin query, e.g. \"SELECT * FROM devices WHERE tags.site='clinic-7'\""
    ),
    conn: str | None = typer.Option(
        None, "--connection-string", envvar="IOTHUB_CONNECTION_STRING", help="with --apply: IoT Hub service"
    ),
    ca_file: Path | None = _HUB_CA,
) -> None:
    """Sign a site operating point and print the twin patch ``{"properties": {"desired": {"operating_points":
    {BUNDLE: ...}}}}``. Each box checks the signature, that the version is not older than the one it holds, and
    that every threshold lies within its manifest's ``threshold_range``; it reports a refusal in
    ``desired_status`` and keeps the operating point in force."""
    from appliance.central.rollout import operating_point_patch
    from appliance.cloud import operating_points
    from engines import keys

    thresholds = dict(map(_threshold, threshold))
    now = int(time.time())
    try:
        op = operating_points.OperatingPoint(
            version=version or now, issued_at=now, site=site, bundle_id=bundle, thresholds=thresholds
        )
        patch = operating_point_patch(operating_points.sign(op, keys.load_private_key(key)))
    except (ValueError, OSError) as exc:
        typer.echo(f"operating point refused: {exc}", err=True)
        raise typer.Exit(2) from exc
    text = json.dumps(patch, sort_keys=True)
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n")
        typer.echo(f"operating point {bundle} version {op.version} for {site} written to {out}", err=True)
    if not apply:
        return
    if not device and not query:
        typer.echo("--apply: name devices with --device or select them with --query", err=True)
        raise typer.Exit(2)
    if not conn:
        typer.echo("--apply needs --connection-string (or IOTHUB_CONNECTION_STRING)", err=True)
        raise typer.Exit(2)
    patch_twins(conn, ca_file, device, query, patch, err=True)


def register(app: typer.Typer) -> None:
    """Add ``operating-point`` to the ``central`` group."""
    central_app.add_typer(op_app, name="operating-point")
