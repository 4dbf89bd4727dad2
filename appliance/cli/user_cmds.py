"""``appliance user add|list|passwd|disable|enable|remove``: the dashboard's local accounts.

There is no default account: the technician makes the first admin with ``appliance user add NAME --role admin``
(password asked twice at the prompt, or one line on stdin with ``--password-stdin``). Every change is recorded
in the audit trail with the actor ``cli:<OS user>``; works whether or not the daemon runs (the accounts are
in ``state.db``).
"""

from __future__ import annotations

import getpass
import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from appliance.cli import settings_from
from appliance.core.audit import AuditEvent, record_event
from appliance.core.store import Store
from appliance.web import accounts
from appliance.web.accounts import AccountError

user_app = typer.Typer(help="Dashboard users: add, list, passwd, disable, enable, remove.", no_args_is_help=True)


def _store(ctx: typer.Context) -> Store:
    return Store(settings_from(ctx).db_path)


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def _password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    first = typer.prompt("Password", hide_input=True)
    again = typer.prompt("Repeat password", hide_input=True)
    if first != again:
        typer.echo("error: the passwords differ", err=True)
        raise typer.Exit(1)
    return str(first)


def _fail(exc: AccountError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@user_app.command("add")
def add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="user name (letters, digits, ._@-)"),
    role: str = typer.Option(..., "--role", "-r", help="viewer, technician or admin"),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="read the password from stdin"),
) -> None:
    """Add a dashboard user (the password: at least 10 characters)."""
    store = _store(ctx)
    try:
        parsed = accounts.parse_role(role)
        accounts.check_name(name)
        user = accounts.add_user(store, name, parsed, _password(password_stdin))
    except AccountError as exc:
        raise _fail(exc) from None
    record_event(store, AuditEvent.USER_ADDED, actor=_actor(), subject=user.name, detail={"role": user.role.value})
    typer.echo(f"user {user.name} added ({user.role.value})")


@user_app.command("list")
def list_(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """List dashboard users."""
    users = accounts.list_users(_store(ctx))
    if as_json:
        typer.echo(json.dumps([u.as_dict() for u in users], indent=2))
        return
    table = Table(title="dashboard users")
    for col in ("name", "role", "state", "last login"):
        table.add_column(col)
    for u in users:
        d = u.as_dict()
        state = "disabled" if u.disabled else ("locked" if d["locked"] else "active")
        last = "" if u.last_login_at is None else _iso(u.last_login_at)
        table.add_row(u.name, u.role.value, state, last)
    Console(emoji=False).print(table)


def _iso(ts: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


@user_app.command("passwd")
def passwd(
    ctx: typer.Context,
    name: str,
    password_stdin: bool = typer.Option(False, "--password-stdin", help="read the password from stdin"),
) -> None:
    """Set a new password (unlocks the user and ends their sessions)."""
    store = _store(ctx)
    try:
        if accounts.get_user(store, name) is None:
            raise AccountError(f"no user {name!r}")
        accounts.set_password(store, name, _password(password_stdin))
    except AccountError as exc:
        raise _fail(exc) from None
    record_event(store, AuditEvent.USER_CHANGED, actor=_actor(), subject=name, detail={"password": "changed"})
    typer.echo(f"password of {name} changed")


def _set_disabled(ctx: typer.Context, name: str, disabled: bool) -> None:
    store = _store(ctx)
    try:
        accounts.set_disabled(store, name, disabled)
    except AccountError as exc:
        raise _fail(exc) from None
    record_event(store, AuditEvent.USER_CHANGED, actor=_actor(), subject=name, detail={"disabled": disabled})
    typer.echo(f"user {name} {'disabled' if disabled else 'enabled'}")


@user_app.command("disable")
def disable(ctx: typer.Context, name: str) -> None:
    """Disable a user (ends their sessions; they cannot log in)."""
    _set_disabled(ctx, name, True)


@user_app.command("enable")
def enable(ctx: typer.Context, name: str) -> None:
    """Enable a disabled user again."""
    _set_disabled(ctx, name, False)


@user_app.command("remove")
def remove(ctx: typer.Context, name: str) -> None:
    """Delete a user and their sessions (the audit trail keeps what they did)."""
    store = _store(ctx)
    try:
        accounts.remove_user(store, name)
    except AccountError as exc:
        raise _fail(exc) from None
    record_event(store, AuditEvent.USER_CHANGED, actor=_actor(), subject=name, detail={"removed": True})
    typer.echo(f"user {name} removed")


def register(app: typer.Typer) -> None:
    app.add_typer(user_app, name="user")
