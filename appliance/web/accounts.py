"""Local accounts of the dashboard and API: the one writer of the ``users`` and ``sessions`` tables.

Roles are ordered ``viewer < technician < admin`` (clinic staff read; technicians also retry, resend, C-ECHO
and run the self-test; admins also manage users). Passwords are hashed with argon2id (``argon2-cffi``'s
:class:`~argon2.PasswordHasher`, RFC 9106 parameters, PHC string in ``users.password_hash``); there is no default
password and no default user: the first admin is made with ``appliance user add NAME --role admin``.

Sessions (OWASP Session Management Cheat Sheet): a 256-bit random token that only the browser holds (the table
stores its sha256), a per-session CSRF token (synchronizer token pattern), an idle timeout (``api.session_ttl_s``)
and an absolute one (``api.session_max_s``); a login always makes a new session (no fixation). A user who fails
``api.lockout_attempts`` logins in a row is locked for ``api.lockout_s`` against new addresses: the right password
from an address the user logged in from before still logs in and clears the lock, and an admin clears it
(:func:`unlock`); guessing from one address is slowed by :class:`appliance.web.security.LoginDelay`.
Disabling, removing a user or changing their password ends their sessions.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import sqlite3
from dataclasses import dataclass
from enum import Enum
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from appliance.core.config import ApiConfig
from appliance.core.store import Store, now

# A user name: the JSON-schema / pydantic form (``$`` there is the end of the text) and Python's (``\Z``: ``$``
# would also match before a final newline, "admin\n").
USER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
USER_NAME = re.compile(USER_NAME_PATTERN[:-1] + r"\Z")
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024  # argon2 takes any length; a megabyte "password" is a denial of service, not a secret

_hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile (64 MiB, t=3, p=4)
# A hash of a random password: verified against when the user does not exist, so an unknown name costs as
# much time as a wrong password (no user enumeration by timing).
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


class Role(str, Enum):
    """Dashboard roles, lowest first; ``a.at_least(b)`` means ``a`` may do what ``b`` may."""

    VIEWER = "viewer"
    TECHNICIAN = "technician"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def at_least(self, other: Role) -> bool:
        """True when this role may do what ``other`` may."""
        return self.rank >= other.rank


class AccountError(ValueError):
    """A refused account change (bad name, weak password, unknown user, duplicate); the message says why."""


@dataclass(frozen=True)
class User:
    """One row of ``users`` without its hash. Times are Unix seconds."""

    id: int
    name: str
    role: Role
    disabled: bool
    failed_attempts: int
    locked_until: float | None
    created_at: float
    last_login_at: float | None

    @property
    def locked(self) -> bool:
        """True while the user is locked (against addresses they never logged in from)."""
        return self.locked_until is not None and self.locked_until > now()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (role as its string)."""
        return {
            "name": self.name,
            "role": self.role.value,
            "disabled": self.disabled,
            "locked": self.locked,
            "failed_attempts": self.failed_attempts,
            "created_at": self.created_at,
            "last_login_at": self.last_login_at,
        }


@dataclass(frozen=True)
class Session:
    """A live session: who, its CSRF token, and the token's hash (the row key)."""

    token_sha256: str
    user: User
    csrf_token: str
    created_at: float
    last_seen_at: float


class LoginOutcome(str, Enum):
    """Why a login succeeded or not (the audit trail records it; the browser only sees "invalid")."""

    OK = "ok"
    BAD_CREDENTIALS = "bad_credentials"
    LOCKED = "locked"  # locked before this attempt
    LOCKED_NOW = "locked_now"  # this failure locked the user
    DISABLED = "disabled"


def _row_user(r: sqlite3.Row) -> User:
    return User(
        id=r["id"],
        name=r["name"],
        role=Role(r["role"]),
        disabled=bool(r["disabled"]),
        failed_attempts=r["failed_attempts"],
        locked_until=r["locked_until"],
        created_at=r["created_at"],
        last_login_at=r["last_login_at"],
    )


def token_hash(token: str) -> str:
    """sha256 hex of a session token (what the table stores)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    """The user name if valid (1-64 of letters, digits, ``._@-``, starting with a letter or digit)."""
    if not USER_NAME.match(name):
        raise AccountError(f"invalid user name {name!r}: 1-64 letters, digits or ._@- (starting alphanumeric)")
    return name


def check_password(password: str) -> str:
    """The password if acceptable: at least ``MIN_PASSWORD_LENGTH`` characters, at most ``MAX_PASSWORD_LENGTH``."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"password too short: at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AccountError(f"password too long: at most {MAX_PASSWORD_LENGTH} characters")
    return password


def parse_role(role: str) -> Role:
    """``Role`` from its name; AccountError naming the choices otherwise."""
    try:
        return Role(role)
    except ValueError:
        raise AccountError(f"unknown role {role!r}: one of {', '.join(r.value for r in Role)}") from None


# -- users -------------------------------------------------------------------------------------------------------


def list_users(store: Store) -> list[User]:
    """Every user, by name."""
    return [_row_user(r) for r in store.query("SELECT * FROM users ORDER BY name")]


def get_user(store: Store, name: str) -> User | None:
    """The user called ``name``, or None."""
    rows = store.query("SELECT * FROM users WHERE name=?", (name,))
    return _row_user(rows[0]) if rows else None


def has_users(store: Store) -> bool:
    """True when at least one enabled user exists."""
    return bool(store.query("SELECT 1 FROM users WHERE disabled=0 LIMIT 1"))


def add_user(store: Store, name: str, role: Role, password: str) -> User:
    """Create a user. Raises AccountError for a bad name or password or a name already taken."""
    check_name(name)
    check_password(password)
    digest = _hasher.hash(password)
    ts = now()
    try:
        with store.transaction() as conn:
            conn.execute(
                "INSERT INTO users(name, role, password_hash, created_at, updated_at) VALUES (?,?,?,?,?)",
                (name, role.value, digest, ts, ts),
            )
    except sqlite3.IntegrityError:
        raise AccountError(f"user {name!r} already exists") from None
    user = get_user(store, name)
    assert user is not None
    return user


def _require(store: Store, name: str) -> User:
    user = get_user(store, name)
    if user is None:
        raise AccountError(f"no user {name!r}")
    return user


def set_password(store: Store, name: str, password: str) -> None:
    """New password for ``name``; clears the lockout and ends the user's sessions. AccountError if refused."""
    _require(store, name)
    check_password(password)
    digest = _hasher.hash(password)
    with store.transaction() as conn:
        conn.execute(
            "UPDATE users SET password_hash=?, failed_attempts=0, locked_until=NULL, updated_at=? WHERE name=?",
            (digest, now(), name),
        )
        conn.execute("DELETE FROM sessions WHERE user_id=(SELECT id FROM users WHERE name=?)", (name,))


def set_role(store: Store, name: str, role: Role) -> None:
    """Change the role of ``name`` (live sessions see it at their next request). AccountError if unknown."""
    _require(store, name)
    with store.transaction() as conn:
        conn.execute("UPDATE users SET role=?, updated_at=? WHERE name=?", (role.value, now(), name))


def set_disabled(store: Store, name: str, disabled: bool) -> None:
    """Disable (ending every session) or enable ``name``. AccountError if unknown."""
    _require(store, name)
    with store.transaction() as conn:
        conn.execute(
            "UPDATE users SET disabled=?, failed_attempts=0, locked_until=NULL, updated_at=? WHERE name=?",
            (int(disabled), now(), name),
        )
        if disabled:
            conn.execute("DELETE FROM sessions WHERE user_id=(SELECT id FROM users WHERE name=?)", (name,))


def unlock(store: Store, name: str) -> bool:
    """Clear ``name``'s lock and failure count (an admin's action); True when the user was locked.
    AccountError if unknown."""
    user = _require(store, name)
    with store.transaction() as conn:
        conn.execute("UPDATE users SET failed_attempts=0, locked_until=NULL, updated_at=? WHERE id=?", (now(), user.id))
    return user.locked_until is not None and user.locked_until > now()


def remove_user(store: Store, name: str) -> None:
    """Delete ``name`` and their sessions. AccountError if unknown."""
    _require(store, name)
    with store.transaction() as conn:
        conn.execute("DELETE FROM sessions WHERE user_id=(SELECT id FROM users WHERE name=?)", (name,))
        conn.execute("DELETE FROM users WHERE name=?", (name,))


# -- login and sessions -----------------------------------------------------------------------------------------


def authenticate(
    store: Store, cfg: ApiConfig, name: str, password: str, known_address: bool = False
) -> tuple[LoginOutcome, User | None]:
    """Check a password, counting failures: ``api.lockout_attempts`` failures in a row lock the user for
    ``api.lockout_s``. While locked, the right password is refused (``LOCKED``, unchecked) unless
    ``known_address`` (the try comes from an address the user logged in from before: the caller decides), in
    which case it is checked and a success clears the lock, so an attacker elsewhere cannot lock the real user
    out. Returns the outcome and the user (None when the name is unknown).

    Each try is counted (in one transaction with the lockout check) *before* the password is checked, so
    concurrent tries cannot all read the same count: however many arrive at once, at most
    ``api.lockout_attempts`` passwords are checked before the lock; the others are answered ``LOCKED``
    unchecked. A correct password sets the count back to zero.
    """
    known = get_user(store, name)
    if known is None or len(password) > MAX_PASSWORD_LENGTH:
        with contextlib.suppress(VerificationError, InvalidHashError):
            _hasher.verify(_DUMMY_HASH, password[:MAX_PASSWORD_LENGTH])
        return LoginOutcome.BAD_CREDENTIALS, known
    ts = now()
    with store.transaction() as conn:  # BEGIN IMMEDIATE: check and count as one step
        row = conn.execute("SELECT * FROM users WHERE name=?", (name,)).fetchone()
        if row is None:
            return LoginOutcome.BAD_CREDENTIALS, None
        user = _row_user(row)
        if user.disabled:
            return LoginOutcome.DISABLED, user
        locked = user.locked_until is not None and user.locked_until > ts
        if locked and not known_address:
            return LoginOutcome.LOCKED, user
        tries = (0 if user.locked_until is not None else user.failed_attempts) + 1  # a past lock starts afresh
        if tries > cfg.lockout_attempts and not known_address:  # the tries that will lock are still checked
            return LoginOutcome.LOCKED, user
        if not locked:
            conn.execute("UPDATE users SET failed_attempts=?, locked_until=NULL WHERE id=?", (tries, user.id))
    try:
        _hasher.verify(row["password_hash"], password)
    except (VerificationError, InvalidHashError):
        if locked:  # a known address's wrong password while locked: the lock stays as it was
            return LoginOutcome.LOCKED, user
        locked = tries >= cfg.lockout_attempts
        if locked:
            with store.transaction() as conn:
                conn.execute(
                    "UPDATE users SET failed_attempts=0, locked_until=? WHERE id=?", (ts + cfg.lockout_s, user.id)
                )
        return (LoginOutcome.LOCKED_NOW if locked else LoginOutcome.BAD_CREDENTIALS), user
    rehash = _hasher.check_needs_rehash(row["password_hash"])
    with store.transaction() as conn:
        conn.execute("UPDATE users SET failed_attempts=0, locked_until=NULL, last_login_at=? WHERE id=?", (ts, user.id))
        if rehash:
            conn.execute("UPDATE users SET password_hash=? WHERE id=?", (_hasher.hash(password), user.id))
    return LoginOutcome.OK, user


def open_session(store: Store, user: User, source_ip: str | None, replaces: str | None = None) -> tuple[str, Session]:
    """A new session for ``user`` (always a fresh token: a token the browser brought is never adopted; the
    session it named, ``replaces``, is deleted). Returns (token for the cookie, session)."""
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    digest = token_hash(token)
    ts = now()
    with store.transaction() as conn:
        if replaces:
            conn.execute("DELETE FROM sessions WHERE token_sha256=?", (token_hash(replaces),))
        conn.execute(
            "INSERT INTO sessions(token_sha256, user_id, csrf_token, created_at, last_seen_at, source_ip)"
            " VALUES (?,?,?,?,?,?)",
            (digest, user.id, csrf, ts, ts, source_ip),
        )
    return token, Session(digest, user, csrf, ts, ts)


def resume_session(store: Store, cfg: ApiConfig, token: str) -> Session | None:
    """The live session of ``token``, its idle clock restarted; None (and the row deleted) when it is unknown,
    idle longer than ``api.session_ttl_s``, older than ``api.session_max_s``, or its user is disabled."""
    digest = token_hash(token)
    rows = store.query(
        "SELECT s.csrf_token, s.created_at, s.last_seen_at, u.* FROM sessions s JOIN users u ON u.id = s.user_id"
        " WHERE s.token_sha256=?",
        (digest,),
    )
    if not rows:
        return None
    r = rows[0]
    ts = now()
    expired = ts - r["last_seen_at"] > cfg.session_ttl_s or ts - r["created_at"] > cfg.session_max_s
    if expired or r["disabled"]:
        with store.transaction() as conn:
            conn.execute("DELETE FROM sessions WHERE token_sha256=?", (digest,))
        return None
    if ts - r["last_seen_at"] > 5:  # not a write per request
        with store.transaction() as conn:
            conn.execute("UPDATE sessions SET last_seen_at=? WHERE token_sha256=?", (ts, digest))
    return Session(digest, _row_user(r), r["csrf_token"], r["created_at"], ts)


def close_session(store: Store, token: str) -> None:
    """End the session of ``token`` (logout); unknown tokens are ignored."""
    with store.transaction() as conn:
        conn.execute("DELETE FROM sessions WHERE token_sha256=?", (token_hash(token),))


def purge_expired_sessions(store: Store, cfg: ApiConfig) -> int:
    """Delete sessions past either timeout; returns how many."""
    ts = now()
    with store.transaction() as conn:
        cur = conn.execute(
            "DELETE FROM sessions WHERE last_seen_at < ? OR created_at < ?",
            (ts - cfg.session_ttl_s, ts - cfg.session_max_s),
        )
        return cur.rowcount
