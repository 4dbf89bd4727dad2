"""``appliance model ...``, ``appliance keys generate``, ``appliance engine ...``.

For the central team (build, sign) and technicians (verify, install, list, activate, rollback, compile).
Every refusal prints the engines' machine-readable reason code and exits 1; nothing half-installed stays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import typer

from appliance.cli import settings_from
from appliance.cli.audit_cmds import record_cli
from appliance.core.audit import FAILURE, AuditEvent
from engines import bundle as B
from engines.errors import EnginesError
from engines.keys import (
    generate_private_key,
    key_id,
    load_private_key,
    public_key_b64,
    write_private_key,
    write_public_key,
)
from engines.registry import Registry

model_app = typer.Typer(
    help="Model bundles: build, sign, verify, install, list, activate, rollback.", no_args_is_help=True
)
keys_app = typer.Typer(help="Signing keys for model bundles.", no_args_is_help=True)
engine_app = typer.Typer(help="Compiled inference engines.", no_args_is_help=True)


def _fail(exc: EnginesError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    typer.echo(f"reason: {exc.reason}", err=True)
    return typer.Exit(1)


# --------------------------------------------------------------------------------------------------
# model


@model_app.command("build")
def build(
    manifest: Path = typer.Option(..., "--manifest", help="manifest JSON without 'files' (hashes are filled in)"),
    model: Path = typer.Option(..., "--model", help="ONNX model"),
    golden: Path | None = typer.Option(None, "--golden", help="golden.npz with input:<name>/output:<name> arrays"),
    golden_inputs: Path | None = typer.Option(
        None, "--golden-inputs", help="npz of inputs by name: golden outputs are computed with ONNX Runtime fp32"
    ),
    asset: list[str] = typer.Option(
        [], "--asset", help="extra file as NAME=PATH (NAME under assets/), e.g. the model's external data"
    ),
    valid_days: int = typer.Option(
        365, "--valid-days", min=1, max=3660, help="expires this many days after created (unless the manifest says)"
    ),
    out: Path = typer.Option(..., "--out", "-o"),
) -> None:
    """Build an UNSIGNED bundle (sign it with ``appliance model sign``)."""
    import tempfile

    from engines.golden import reference_outputs, save_golden

    if (golden is None) == (golden_inputs is None):
        typer.echo("error: give exactly one of --golden or --golden-inputs", err=True)
        raise typer.Exit(2)
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        typer.echo(f"error: cannot read manifest {manifest}: {exc}", err=True)
        raise typer.Exit(2) from exc
    with tempfile.TemporaryDirectory() as tmp:
        if golden is None:
            with np.load(golden_inputs, allow_pickle=False) as npz:  # type: ignore[arg-type]
                inputs = {k: npz[k] for k in npz.files}
            golden = Path(tmp) / "golden.npz"
            save_golden(golden, inputs, reference_outputs(model, inputs))
        files = {"model.onnx": model, "golden.npz": golden}
        for a in asset:
            name, _, path = a.partition("=")
            if not path:
                typer.echo(f"error: --asset must be NAME=PATH, got {a!r}", err=True)
                raise typer.Exit(2)
            files[f"assets/{name}"] = Path(path)
        try:
            m = B.build_bundle(out, doc, files, valid_days=valid_days)
        except EnginesError as exc:
            raise _fail(exc) from exc
    typer.echo(f"built {out} ({m.bundle_id}@{m.version}, unsigned, expires {m.expires})")


@model_app.command("sign")
def sign_cmd(
    bundle: Path,
    key: Path = typer.Option(..., "--key", help="Ed25519 private key (PEM)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="write here instead of in place"),
) -> None:
    """Sign a bundle's manifest (which pins every file's sha256) with an Ed25519 key."""
    try:
        kid = B.sign_bundle(bundle, load_private_key(key), out)
    except EnginesError as exc:
        raise _fail(exc) from exc
    typer.echo(f"signed {out or bundle} with key {kid}")


@model_app.command("verify")
def verify(ctx: typer.Context, bundle: Path, as_json: bool = typer.Option(False, "--json")) -> None:
    """Check a bundle file against this box's trusted keys: signed manifest first (signature, expiry), then each
    file's size and hash as it streams, external data inside the bundle, appliance version."""
    from appliance.models.active import engine_options, trust_store

    settings = settings_from(ctx)
    try:
        v = B.verify_bundle(bundle, trust_store(settings), appliance_version=engine_options(settings).appliance_version)
    except EnginesError as exc:
        if as_json:
            typer.echo(json.dumps({"ok": False, "reason": exc.reason, "error": str(exc)}))
        raise _fail(exc) from exc
    m = v.manifest
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": True,
                    "bundle_id": m.bundle_id,
                    "version": m.version,
                    "key_id": v.key_id,
                    "digest": v.digest,
                    "clinical_use": m.clinical_use,
                    "expires": m.expires,
                }
            )
        )
    else:
        typer.echo(f"OK {m.bundle_id}@{m.version} signed by {v.key_id}, expires {m.expires} - {m.title}")


@model_app.command("install")
def install(
    ctx: typer.Context,
    bundle: Path,
    activate: bool = typer.Option(True, "--activate/--no-activate", help="activate after a passed golden check"),
    force: bool = typer.Option(False, "--force", help="allow a downgrade (technician only)"),
) -> None:
    """Verify and install a bundle; by default compile it for this box, golden-check it, activate it."""
    from appliance.models.active import engine_options, trust_store
    from engines import runtime

    settings = settings_from(ctx)
    try:
        v = runtime.install_bundle(
            settings.models_dir, bundle, trust_store(settings), engine_options(settings), activate=activate, force=force
        )
    except EnginesError as exc:
        record_cli(settings, AuditEvent.MODEL_INSTALLED, bundle.name, outcome=FAILURE, detail={"reason": exc.reason})
        raise _fail(exc) from exc
    m = v.manifest
    record_cli(settings, AuditEvent.MODEL_INSTALLED, f"{m.bundle_id}@{m.version}", detail={"activated": activate})
    typer.echo(f"installed {m.bundle_id}@{m.version}" + (" (active)" if activate else ""))


def operating_points_in_force(settings: Any) -> dict[str, dict[str, Any]]:
    """Bundle id -> ``{"version", "site", "thresholds"}`` of the site operating points in force (the cloud
    overlay in ``state.db``, read only); empty when there is none or no database yet."""
    import sqlite3

    from appliance.cli.study_cmds import open_store
    from appliance.cloud.overlay import CloudOverlay

    store = open_store(settings, read_only=True)
    if store is None:
        return {}
    try:
        ops = CloudOverlay(settings.cloud, store).current().operating_points
        return {b: {"version": op.version, "site": op.site, "thresholds": dict(op.thresholds)} for b, op in ops.items()}
    except (sqlite3.Error, ValueError):
        return {}
    finally:
        store.close()


@model_app.command("list")
def list_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Installed bundles, their versions and which one is active, with the site operating point in force on
    the active version (thresholds set by the central team; the manifest's otherwise)."""
    from appliance.models.active import registry

    settings = settings_from(ctx)
    reg = registry(settings)
    rows = reg.list()
    contract = {(r.bundle_id, r.version): _declares_contract(reg, r.bundle_id, r.version) for r in rows}
    ops = operating_points_in_force(settings)
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "bundle_id": r.bundle_id,
                        "version": r.version,
                        "active": r.active,
                        "previous": r.previous,
                        "key_id": r.key_id,
                        "installed_at": r.installed_at,
                        "failure": r.failure,
                        "input_contract": contract[(r.bundle_id, r.version)],
                        "operating_point": ops.get(r.bundle_id) if r.active else None,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return
    if not rows:
        typer.echo("no bundles installed")
    for r in rows:
        flag = "*" if r.active else ("<" if r.previous else " ")
        fail = f"  FAILED: {r.failure['reason']}" if r.failure else ""
        op = ops.get(r.bundle_id) if r.active else None
        site = ""
        if op:
            thr = ", ".join(f"{k}={v:g}" for k, v in sorted(op["thresholds"].items()))
            site = f"  site operating point v{op['version']} ({op['site']}): {thr}"
        typer.echo(f"{flag} {r.bundle_id:<24} {r.version:<12} key {r.key_id} {r.installed_at}{fail}{site}")
        if contract[(r.bundle_id, r.version)] is False:
            typer.echo(
                f"  warning: {r.bundle_id} {r.version} declares no input contract (applies_to.input_contract): "
                "only its modality, SOP class, anatomy, view and laterality are checked, not image kind, "
                "presentation intent, patient age or encoding"
            )


def _declares_contract(reg: Registry, bundle_id: str, version: str) -> bool | None:
    """Whether the installed manifest declares ``applies_to.input_contract`` (None: manifest unreadable)."""
    try:
        return reg.manifest(bundle_id, version).applies_to.input_contract is not None
    except Exception:
        return None


@model_app.command("activate")
def activate_cmd(
    ctx: typer.Context,
    bundle_id: str,
    version: str,
    force: bool = typer.Option(False, "--force", help="allow going down a version / retry a failed one"),
) -> None:
    """Compile + golden-check an installed version on this box, then make it active (atomically)."""
    from appliance.models.active import engine_options, trust_store
    from engines import runtime

    settings = settings_from(ctx)
    try:
        res = runtime.activate_checked(
            settings.models_dir, bundle_id, version, trust_store(settings), engine_options(settings), force=force
        )
        res.engine.close()
    except EnginesError as exc:
        record_cli(
            settings,
            AuditEvent.MODEL_ACTIVATED,
            f"{bundle_id}@{version}",
            outcome=FAILURE,
            detail={"reason": exc.reason},
        )
        raise _fail(exc) from exc
    record_cli(settings, AuditEvent.MODEL_ACTIVATED, f"{bundle_id}@{version}", detail={"backend": res.backend})
    typer.echo(f"active {bundle_id}@{version} ({res.backend}/{res.precision})")


@model_app.command("rollback")
def rollback_cmd(ctx: typer.Context, bundle_id: str) -> None:
    """Switch a bundle back to its previous version."""
    from appliance.models.active import registry

    settings = settings_from(ctx)
    try:
        version = registry(settings).rollback(bundle_id)
    except EnginesError as exc:
        record_cli(settings, AuditEvent.MODEL_ROLLED_BACK, bundle_id, outcome=FAILURE, detail={"reason": exc.reason})
        raise _fail(exc) from exc
    record_cli(settings, AuditEvent.MODEL_ROLLED_BACK, f"{bundle_id}@{version}")
    typer.echo(f"active {bundle_id}@{version} (rolled back)")


# --------------------------------------------------------------------------------------------------
# keys


@keys_app.command("generate")
def keys_generate(
    out_dir: Path = typer.Option(Path("."), "--out-dir", "-o"),
    name: str = typer.Option("bundle-signing", "--name"),
) -> None:
    """Create an Ed25519 signing key pair: NAME.pem (private, 0600) and NAME.pub (key id + public key)."""
    priv, pub = out_dir / f"{name}.pem", out_dir / f"{name}.pub"
    if priv.exists():
        typer.echo(f"error: {priv} exists; refusing to overwrite a private key", err=True)
        raise typer.Exit(1)
    key = generate_private_key()
    write_private_key(key, priv)
    write_public_key(key, pub)
    kid = key_id(key)
    typer.echo(f"key id {kid}\nprivate key {priv} (keep it offline)\npublic key {pub}")
    typer.echo(f'config: [engines.trusted_keys]\n"{kid}" = "{public_key_b64(key)}"')


# --------------------------------------------------------------------------------------------------
# engine


@engine_app.command("compile")
def engine_compile(
    ctx: typer.Context,
    bundle_id: list[str] = typer.Argument(None, help="bundle ids (default: every active bundle)"),
    rebuild: bool = typer.Option(False, "--rebuild", help="ignore the cache"),
) -> None:
    """Compile (or load from cache) and golden-check the active engines, with progress."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from appliance.models.active import engine_options, registry
    from engines import runtime

    settings = settings_from(ctx)
    reg = registry(settings)
    ids = bundle_id or [b for b in reg.bundle_ids() if reg.active_version(b)]
    failed = 0
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn()
    ) as progress:
        for bid in ids:
            task = progress.add_task(f"{bid}: starting", total=1)

            def cb(phase: str, done: int, total: int, _task=task, _bid=bid) -> None:
                progress.update(_task, description=f"{_bid}: {phase}", completed=done, total=max(total, 1))

            try:
                res = runtime.compile_engine(
                    settings.models_dir, bid, engine_options(settings), trust=reg.trust, rebuild=rebuild, progress=cb
                )
                res.engine.close()
                src = "cache" if res.cache_hit else "built"
                progress.update(
                    task,
                    description=f"{bid}@{res.version}: {res.backend}/{res.precision} {src}, golden OK",
                    completed=1,
                    total=1,
                )
            except EnginesError as exc:
                failed += 1
                progress.update(task, description=f"{bid}: FAILED [{exc.reason}]")
                progress.console.print(f"error: {exc}", style="red")
    raise typer.Exit(1 if failed else 0)


@engine_app.command("list")
def engine_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Cached compiled engines (bundle, backend, hardware, precision, golden result)."""
    from engines.cache import EngineCache

    entries = EngineCache(settings_from(ctx).models_dir / "cache").entries()
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        typer.echo("no compiled engines")
    for e in entries:
        k = e.get("key_fields", {})
        golden = e.get("golden", {}).get("passed")
        typer.echo(
            f"{e.get('bundle', e['bundle_id']):<28} {k.get('backend', '?')} {k.get('backend_version', '')} "
            f"{e.get('precision', '?')} golden={'ok' if golden else golden} {e['size']} bytes"
        )


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
    app.add_typer(keys_app, name="keys")
    app.add_typer(engine_app, name="engine")
