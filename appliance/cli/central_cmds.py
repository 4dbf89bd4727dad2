"""``appliance central ...``: the central team's tools (recipient key pairs, signed recipient key sets, decrypting
payloads)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

central_app = typer.Typer(help="Central-team tools: recipient keys and payload decryption.", no_args_is_help=True)


@central_app.command("keygen")
def keygen(
    out: Path = typer.Option(..., "--out", help="directory for <kid>.key (private, 0600) and <kid>.pub"),
    kid: str = typer.Option(..., "--kid", help="key id devices will name in envelopes, e.g. central-2025"),
) -> None:
    """Make an X25519 recipient key pair; put the public key in every box's cloud.recipient_keys."""
    from appliance.cloud import crypto

    if not kid or "/" in kid or len(kid) > 64:
        typer.echo("--kid must be 1-64 characters without '/'", err=True)
        raise typer.Exit(2)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{kid}.key", out / f"{kid}.pub"
    if priv_path.exists():
        typer.echo(f"{priv_path} exists: refusing to overwrite a private key", err=True)
        raise typer.Exit(1)
    priv, pub = crypto.generate_keypair()
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(priv + "\n")
    pub_path.write_text(pub + "\n")
    typer.echo(json.dumps({"kid": kid, "public_key": pub, "private_key_file": str(priv_path)}))
    typer.echo(f'config: [cloud.recipient_keys] "{kid}" = "{pub}"', err=True)


def _load_keys(key_files: list[Path]) -> dict[str, str]:
    keys = {}
    for p in key_files:
        if p.is_dir():
            for f in sorted(p.glob("*.key")):
                keys[f.stem] = f.read_text().strip()
        else:
            keys[p.stem] = p.read_text().strip()
    return keys


@central_app.command("decrypt")
def decrypt(
    key: list[Path] = typer.Option(..., "--key", help="<kid>.key file or a directory of them (repeatable)"),
    infile: Path | None = typer.Argument(None, help="events or envelopes, one per line; '-' or none = stdin"),
    device: str | None = typer.Option(
        None, "--device", help="for bare envelopes only: the sender identity the hub reported for them"
    ),
) -> None:
    """Read messages exported from the hub (one JSON event per line, with the hub's system properties) to JSON:
    {"device", "meta", "payload"} for each one whose envelope names the device the hub authenticated
    (iothub-connection-device-id). Every other line is reported on stderr with its reason and the rest are still
    read; exit 1 if any line was refused."""
    from appliance.central.received import Refused, open_message

    keys = _load_keys(key)
    if not keys:
        typer.echo("no private keys found", err=True)
        raise typer.Exit(2)
    data = sys.stdin.buffer.read() if infile is None or str(infile) == "-" else infile.read_bytes()
    lines = [ln for ln in data.splitlines() if ln.strip()] or [data]
    failed = 0
    for n, line in enumerate(lines, 1):
        try:
            opened = open_message(line, keys, device)
        except Refused as exc:
            typer.echo(f"message {n} refused: {exc}", err=True)
            failed += 1
            continue
        try:
            body = json.loads(opened.plaintext)
        except ValueError:
            body = opened.plaintext.decode("utf-8", "replace")
        typer.echo(json.dumps({"device": opened.device, "meta": opened.meta, "payload": body}, sort_keys=True))
    raise typer.Exit(1 if failed else 0)


keyset_app = typer.Typer(
    help="Signed recipient key sets: the only way the twin may change which keys results are encrypted to.",
    no_args_is_help=True,
)


@keyset_app.command("keygen")
def keyset_keygen(
    out: Path = typer.Option(..., "--out", help="directory for keyset-signing.pem (private, 0600) and .pub"),
) -> None:
    """Make the central team's Ed25519 key-set signing key; its public line goes into every box's
    ``cloud.keyset_trusted_keys`` at provisioning."""
    from engines import keys

    priv_path, pub_path = out / "keyset-signing.pem", out / "keyset-signing.pub"
    if priv_path.exists():
        typer.echo(f"{priv_path} exists: refusing to overwrite a private key", err=True)
        raise typer.Exit(1)
    key = keys.generate_private_key()
    keys.write_private_key(key, priv_path)
    keys.write_public_key(key, pub_path)
    kid, pub = keys.key_id(key), keys.public_key_b64(key)
    typer.echo(json.dumps({"key_id": kid, "public_key": pub, "private_key_file": str(priv_path)}))
    typer.echo(f'config: [cloud.keyset_trusted_keys] "{kid}" = "{pub}"', err=True)


def _recipient(spec: str) -> tuple[str, str]:
    kid, sep, value = spec.partition("=")
    if not sep or not kid or not value:
        raise typer.BadParameter(f"{spec!r}: expected KID=PUBLIC_KEY (base64) or KID=FILE.pub")
    path = Path(value)
    return kid, (path.read_text().strip() if path.is_file() else value.strip())


@keyset_app.command("sign")
def keyset_sign(
    key: Path = typer.Option(..., "--key", help="the key-set signing key (PEM, from `central keyset keygen`)"),
    version: int = typer.Option(..., "--version", min=1, help="must be above every set signed before"),
    recipient: list[str] = typer.Option(..., "--recipient", help="KID=X25519 public key (base64) or KID=FILE.pub"),
    expires_days: float = typer.Option(365.0, "--expires-days", min=0.0001, help="validity from now"),
    out: Path | None = typer.Option(None, "--out", help="write the signed set here (default: stdout)"),
) -> None:
    """Sign a recipient key set; put the JSON into the twin's desired ``recipient_keyset`` (and optionally
    ``recipient_key_ids`` to pick among its keys)."""
    import time

    from appliance.cloud import keysets
    from engines import keys

    now = int(time.time())
    try:
        keyset = keysets.KeySet(
            version=version,
            issued_at=now,
            expires_at=now + int(expires_days * 86400),
            keys=dict(map(_recipient, recipient)),
        )
    except ValueError as exc:
        typer.echo(f"key set refused: {exc}", err=True)
        raise typer.Exit(2) from exc
    text = json.dumps(keysets.sign(keyset, keys.load_private_key(key)), sort_keys=True)
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n")
        typer.echo(f"signed key set version {version} written to {out}", err=True)


central_app.add_typer(keyset_app, name="keyset")


def register(app: typer.Typer) -> None:
    app.add_typer(central_app, name="central")
