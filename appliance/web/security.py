"""Who is asking, and may they: session cookies, roles, CSRF tokens, login throttling, request size.

- **Session cookie** ``__Host-session``: ``Secure; HttpOnly; SameSite=Strict; Path=/`` (the ``__Host-`` prefix
  forbids a ``Domain`` attribute, so no other host can plant it). Its value is the session token of
  :mod:`appliance.web.accounts`.
- **Roles**: API routes depend on :func:`api_role`, pages on :func:`page_role`. Without a live session the API
  answers 401 and pages redirect to ``/login``; a role too low gets 403 either way.
- **CSRF** (OWASP synchronizer token pattern): every state-changing request carries the session's CSRF token,
  in the ``X-CSRF-Token`` header (API) or the ``csrf_token`` form field (pages); missing or wrong -> 403. The
  login form, which has no session yet, uses a double-submit cookie (``__Host-login_csrf``).
- **Throttling**: :class:`FailureLimiter` counts failed logins per source address (an IPv6 one by its /64:
  :func:`throttle_key`) in a sliding window (429 beyond ``api.ip_max_failures`` per ``api.ip_window_s``); a
  try is counted when it starts and uncounted if it logs in, so concurrent tries get no more than the limit.
  :class:`LoginDelay` slows guessing one user's password from one address (exponential delay per user+address),
  so an attacker elsewhere never delays the real user. The per-user lock is in the accounts module; it does not
  hold against an address the user logged in from before, and an admin clears it.
- **Request size**: FastAPI's ``max_body_size`` (``api.max_body_bytes``) answers 413 for a larger body, whether
  announced by Content-Length or streamed (see :func:`appliance.web.app.create_app`).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request

from appliance.core.config import ApiConfig, Settings
from appliance.core.store import Store
from appliance.web import accounts
from appliance.web.accounts import Role, Session

SESSION_COOKIE = "__Host-session"
LOGIN_CSRF_COOKIE = "__Host-login_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class LoginRequired(Exception):
    """A page was asked for without a live session: the app redirects to the login page."""

    def __init__(self, next_path: str):
        self.next_path = next_path


class FailureLimiter:
    """Failed logins per source IP in a sliding window (in memory, per daemon process; thread-safe)."""

    def __init__(self, max_failures: int, window_s: float):
        self.max_failures = max_failures
        self.window_s = window_s
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _trim(self, ip: str, at: float) -> deque[float]:
        q = self._seen.setdefault(ip, deque())
        while q and q[0] <= at - self.window_s:
            q.popleft()
        return q

    def begin(self, ip: str) -> float | None:
        """Reserve one try for ``ip``: None when it has used up its failures in the current window, else a
        ticket for :meth:`succeeded`. The try counts as a failure from now on, so concurrent tries from one
        address cannot all pass the check before any of them is counted."""
        with self._lock:
            now = time.monotonic()
            q = self._trim(ip, now)
            if len(q) >= self.max_failures:
                return None
            q.append(now)
            if len(self._seen) > 10_000:  # an address sweep must not grow memory without bound
                for key in [k for k, v in self._seen.items() if not v or v[-1] <= now - self.window_s]:
                    del self._seen[key]
            return now

    def succeeded(self, ip: str, ticket: float) -> None:
        """The try of ``ticket`` (from :meth:`begin`) logged in: it no longer counts as a failure."""
        with self._lock:
            q = self._seen.get(ip)
            if q is not None:
                with contextlib.suppress(ValueError):
                    q.remove(ticket)
                if not q:
                    del self._seen[ip]


class LoginDelay:
    """Exponential delay per (user name, address) after failed logins (in memory, per process; thread-safe).

    The first ``free`` tries of a pair are unhindered; from then on each try must wait ``base_s * 2**(n - free)``
    seconds (at most ``max_s``) after the previous one, ``n`` being the pair's failures so far. A try is counted
    when it starts (:meth:`begin`), so concurrent tries of a pair cannot pass together; a successful login
    forgets the pair. Only the pair is slowed: the same user from another address, or another user from this
    address, is not (the per-address :class:`FailureLimiter` bounds an address across users)."""

    def __init__(self, free: int = 3, base_s: float = 1.0, max_s: float = 900.0, max_pairs: int = 10_000):
        self.free, self.base_s, self.max_s, self.max_pairs = free, base_s, max_s, max_pairs
        self._pairs: dict[tuple[str, str], tuple[int, float]] = {}  # -> (failures, next try allowed at)
        self._lock = threading.Lock()

    def begin(self, name: str, key: str) -> float:
        """0.0 when the pair may try now (the try is counted as a failure until :meth:`succeeded`), else the
        seconds it must still wait (the try is not made)."""
        pair = (name.lower(), key)
        with self._lock:
            now = time.monotonic()
            failures, allowed_at = self._pairs.get(pair, (0, 0.0))
            if now < allowed_at:
                return allowed_at - now
            failures += 1
            wait = 0.0 if failures < self.free else min(self.base_s * 2 ** (failures - self.free), self.max_s)
            self._pairs[pair] = (failures, now + wait)
            if len(self._pairs) > self.max_pairs:  # a sweep of names or addresses must not grow memory
                for old in [k for k, (_, at) in self._pairs.items() if at + self.max_s < now]:
                    del self._pairs[old]
            return 0.0

    def succeeded(self, name: str, key: str) -> None:
        """The pair logged in: its failures are forgotten."""
        with self._lock:
            self._pairs.pop((name.lower(), key), None)

    def clear_user(self, name: str) -> None:
        """Forget every address's failures for ``name`` (an admin unlocked the user)."""
        with self._lock:
            for pair in [p for p in self._pairs if p[0] == name.lower()]:
                del self._pairs[pair]


@dataclass
class WebAuth:
    """What the auth dependencies need; one per app (``app.state.auth``)."""

    settings: Settings
    store: Store
    limiter: FailureLimiter
    delay: LoginDelay = field(default_factory=LoginDelay)

    @property
    def cfg(self) -> ApiConfig:
        return self.settings.api


def client_ip(request: Request) -> str | None:
    """The peer's IP address, or None when the peer is not an IP socket (no proxy headers are trusted: the box
    serves the LAN directly)."""
    host = request.client.host if request.client else None
    try:
        return str(ipaddress.ip_address(host)) if host else None
    except ValueError:
        return None


def throttle_key(ip: str | None) -> str:
    """What the login limiter counts failures by: an IPv4 address (an IPv4-mapped IPv6 address as its IPv4),
    the /64 network of an IPv6 address (a host chooses its own interface identifier within its /64, RFC 4862
    and RFC 8981, so one host has as many addresses as it likes there), or ``"unknown"`` without an address."""
    if ip is None:
        return "unknown"
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def session_of(request: Request) -> Session | None:
    """The live session named by the request's cookie, or None (cached on the request)."""
    if hasattr(request.state, "session"):
        return request.state.session  # type: ignore[no-any-return]
    auth: WebAuth = request.app.state.auth
    token = request.cookies.get(SESSION_COOKIE)
    session = accounts.resume_session(auth.store, auth.cfg, token) if token else None
    request.state.session = session
    return session


def csrf_ok(session: Session, presented: str | None) -> bool:
    """Constant-time comparison of the presented CSRF token with the session's."""
    return bool(presented) and hmac.compare_digest(session.csrf_token.encode(), (presented or "").encode())


def api_role(minimum: Role) -> Callable[[Request], Session]:
    """FastAPI dependency for ``/api/v1`` routes: 401 without a live session, 403 below ``minimum``, and 403
    for a state-changing method whose ``X-CSRF-Token`` header is not the session's token."""

    def dependency(request: Request) -> Session:
        session = session_of(request)
        if session is None:
            raise HTTPException(401, "not logged in (or the session expired): POST /api/v1/session")
        if not session.user.role.at_least(minimum):
            raise HTTPException(
                403, f"needs the {minimum.value} role; {session.user.name} is {session.user.role.value}"
            )
        if request.method not in SAFE_METHODS and not csrf_ok(session, request.headers.get(CSRF_HEADER)):
            raise HTTPException(403, f"missing or wrong {CSRF_HEADER} header (the csrf_token given at login)")
        return session

    return dependency


def page_role(minimum: Role) -> Callable[[Request], Awaitable[Session]]:
    """FastAPI dependency for HTML pages: a redirect to ``/login`` without a live session, 403 below
    ``minimum``, and 403 for a state-changing form without the session's ``csrf_token`` field."""

    async def dependency(request: Request) -> Session:
        session = session_of(request)
        if session is None:
            path = request.url.path if request.method in SAFE_METHODS else "/"
            raise LoginRequired(path)
        if not session.user.role.at_least(minimum):
            raise HTTPException(403, f"this page needs the {minimum.value} role")
        if request.method not in SAFE_METHODS:
            form = await request.form()
            presented = form.get(CSRF_FIELD)
            if not csrf_ok(session, presented if isinstance(presented, str) else None):
                raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
        return session

    return dependency


def security_headers() -> list[tuple[str, str]]:
    """Headers on every response: no framing, no sniffing, only our own scripts/styles/images."""
    return [
        (
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
        ("X-Frame-Options", "DENY"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "same-origin"),
        ("Cache-Control", "no-store"),
        ("Strict-Transport-Security", "max-age=31536000"),
    ]


def cookie_args(max_age: float | None = None) -> dict[str, Any]:
    """Attributes of every cookie we set."""
    args: dict[str, Any] = {"secure": True, "httponly": True, "samesite": "strict", "path": "/"}
    if max_age is not None:
        args["max_age"] = int(max_age)
    return args
