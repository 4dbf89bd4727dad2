"""The ``appliance`` command line.

Each module in this package that defines ``register(app)`` adds its commands, and so does every
``register`` named in the ``appliance.cli`` entry-point group (how ``provisioning``, a layer above, adds
``appliance provision ...`` without the appliance importing it); the global options
(``--config``, ``--home``) are resolved once by :func:`settings_from` so every command sees one config.
"""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import sys
from importlib.metadata import entry_points
from pathlib import Path

import typer

from appliance import __version__
from appliance.core.config import ConfigError, Settings, load_settings
from durable.ownership import hand_over

app = typer.Typer(
    name="appliance",
    help="Clinic AI appliance: DICOM in, AI findings back to PACS, sync with the central team.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class CliState:
    def __init__(self, config: Path | None, home: Path | None):
        self.config = config
        self.home = home
        self._settings: Settings | None = None

    def settings(self) -> Settings:
        if self._settings is None:
            overrides = {"state_dir": self.home} if self.home else None
            self._settings = load_settings(self.config, overrides)
        return self._settings


def settings_from(ctx: typer.Context) -> Settings:
    """The effective settings for this invocation; exits 2 with every problem named if invalid."""
    state: CliState = ctx.find_root().obj
    try:
        return state.settings()
    except ConfigError as exc:
        for p in exc.problems:
            typer.echo(f"config error: {p}", err=True)
        raise typer.Exit(2) from exc


def command() -> str:
    """How to run ``appliance`` from the user's shell, for hints printed to people: ``appliance`` when that name
    on PATH is this installation's, else the full path of this installation's script (``.../.venv/bin/appliance``
    after ``./bootstrap.sh run``: a virtual environment's bin is not on PATH), else ``<python> -m appliance``."""
    script = Path(sys.executable).parent / "appliance"
    found = shutil.which("appliance")
    if found and script.is_file() and Path(found).resolve() == script.resolve():
        return "appliance"
    if script.is_file():
        return str(script.absolute())
    return f"{sys.executable} -m appliance"


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", "-c", envvar="APPLIANCE_CONFIG", help="TOML config file"),
    home: Path | None = typer.Option(None, "--home", help="state directory (overrides state_dir)"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True),
) -> None:
    ctx.obj = CliState(config, home)
    ctx.call_on_close(lambda: _hand_over_state_dir(ctx.obj))


def _hand_over_state_dir(state: CliState) -> None:
    """After every command: files it created under the state directory as root go to the directory's owner, the
    service user (``durable.ownership.hand_over``; docs/INSTALL.md)."""
    settings = state._settings
    if settings is None:  # the command never read the configuration: it wrote nothing there
        return
    try:
        n = hand_over(settings.state_dir)
    except OSError as exc:
        typer.echo(f"warning: could not give new files in {settings.state_dir} to its owner: {exc}", err=True)
        return
    if n:
        typer.echo(f"{n} new file(s) in {settings.state_dir} given to its owner (the service user)", err=True)


def _register_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{mod.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)
    for ep in entry_points(group="appliance.cli"):
        ep.load()(app)


_register_all()


def main() -> None:
    app()
