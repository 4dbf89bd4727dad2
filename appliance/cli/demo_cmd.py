"""``appliance demo``: start the box with the reference models, send phantom studies, show the findings."""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from appliance.app.daemon import read_status
from appliance.cli import command, settings_from
from appliance.worklist.display import finding_text


def _findings_table(summary: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"{summary['bundle_id']} {summary['bundle_version']}", title_justify="left")
    for col in ("image", "side/view", "finding", "score", "threshold", "result", "row, col"):
        table.add_column(col, justify="right" if col in ("score", "threshold") else "left")
    for f in summary["findings"]:
        loc = f["location"]
        table.add_row(
            "…" + f["image_sop_uid"][-8:],
            "/".join(x for x in (f["laterality"], f["view"]) if x) or "-",
            f["label"],
            f"{f['score']:.3f}",
            f"{f['threshold']:.3f}",
            "[bold red]POSITIVE[/]" if f["positive"] else "negative",
            "; ".join(  # every place, with the patient side it lies on
                f"{p.get('side') or ''} {p['row']:.0f}, {p['col']:.0f}".strip()
                for p in (f.get("locations") or ([loc] if loc else []))
            ),
        )
    return table


def demo_cmd(
    ctx: typer.Context,
    home: Path | None = typer.Option(None, "--home", help="state directory (default: a new temporary one)"),
    keep: bool = typer.Option(False, "--keep", help="leave the appliance running afterwards"),
    timeout: float = typer.Option(120.0, help="seconds to wait for all results"),
) -> None:
    """Start the appliance with the reference models, send three phantom studies over DICOM, show findings."""
    from rich.console import Console

    from appliance.app import demo

    console = Console(highlight=False, emoji=False)
    root = ctx.find_root().obj
    home = (home or root.home or Path(tempfile.mkdtemp(prefix="appliance-demo-"))).resolve()
    root.home = home
    if root.config is None:  # the later commands it suggests read the demo's settings from this file
        root.config = demo.write_demo_config(home)
    settings = settings_from(ctx)
    t0 = time.monotonic()
    console.print(f"[bold]appliance demo[/] home: {home}")
    console.print("NOT FOR CLINICAL USE: reference models trained on synthetic phantoms only.", style="red")
    running = read_status(settings)
    if running is not None:
        console.print(
            f"[red]error:[/] an appliance (pid {running['pid']}) is already running on {home}; "
            f"stop it first (kill {running['pid']}) or give another --home"
        )
        raise typer.Exit(1)
    # stopped by a signal (a terminal closed, a service manager, kill): the finally below still stops the
    # daemon, which runs in its own session and would otherwise outlive the demo
    signalled: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        signalled.append(signum)
        sys.exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        proc, status = demo.start_daemon(home, root.config)
    except RuntimeError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    scp = status["services"]["dicom-scp"]
    console.print(f"appliance running (pid {proc.pid}), DICOM {scp['ae_title']}@127.0.0.1:{scp['port']}")
    rc = 0
    try:
        studies = demo.write_studies(home / "demo-input")
        for study in studies:
            failed = demo.send_study(settings, scp, study)
            console.print(
                f"sent   {study.name} ({len(study.files)} image(s))" + (f" [red]{failed}[/]" if failed else "")
            )
            rc = rc or (1 if failed else 0)

        def show(study: demo.DemoStudy, row: Any, results: list[dict]) -> None:
            console.print()
            console.print(f"[bold]{study.name}[/]: {row['state']} after {time.monotonic() - t0:.1f} s")
            if not results:
                console.print(f"  {row['detail'] or ''}")
            for summary in results:
                console.print(_findings_table(summary))
                extra = f"study score {summary['study_score']:.3f}"
                if summary.get("per_breast"):
                    extra += "".join(f"   {k} breast {v:.3f}" for k, v in sorted(summary["per_breast"].items()))
                console.print("  " + extra)
                mammo = summary.get("per_breast") is not None
                for r in summary.get("reading") or []:  # as a radiologist reads it: per breast / side
                    text = finding_text(r, mammo)
                    console.print(f"  {text}", style="bold" if r["positive"] else "dim", markup=False)
                for obj in summary.get("objects", []):
                    typer.echo(f"  {obj['kind']}: {home / obj['path']}")  # relative to the home: print it whole

        missing = demo.wait_for_results(home, studies, show, timeout)
        if missing:
            console.print(f"[red]no result within {timeout:g} s for:[/] {', '.join(s.name for s in missing)}")
            rc = 1
    finally:
        if keep:
            console.print(f"\nstill running (pid {proc.pid}); stop it with: kill {proc.pid}")
            web = status["services"].get("web")
            if web:
                cert = "self-signed certificate" if web.get("self_signed") else "certificate"
                typer.echo(f"dashboard: {web['url']} ({cert}, SHA-256 {web['certificate_sha256']})")
                typer.echo(
                    f"  log in there after making a user: {command()} --home {home} --config {root.config} "
                    "user add NAME --role admin"
                )
        else:
            demo.stop_daemon(proc)
    # from here on a signal ends the process the default way (never an exit status of 0 after a signal, even
    # one that lands while the interpreter shuts down and can no longer run a Python handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    if signalled:
        raise typer.Exit(128 + signalled[0])
    console.print(f"\ndone in {time.monotonic() - t0:.1f} s. Logs: {home / 'demo-daemon.log'}")
    cmd = f"{command()} --home {home} --config {root.config}"
    console.print("Try:", highlight=False)
    for hint in ("studies", "study show 1", "status", "selftest --no-pacs", f"infer {home / 'demo-input'}"):
        typer.echo(f"  {cmd} {hint}")
    if not keep:
        typer.echo("  (with --keep the appliance stays running, with its web dashboard: `status` shows its URL)")
    raise typer.Exit(rc)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)
