"""The web server as a daemon service: uvicorn serving :func:`appliance.web.app.create_app` over HTTPS.

``start`` binds the socket itself (so a port in use fails the daemon's start with the reason, and port 0
gives the kernel's choice, published by ``status``), makes or loads the TLS certificate, and returns once
uvicorn is serving on its own thread (uvicorn leaves signal handling to the daemon's main thread). ``stop``
asks uvicorn to finish open requests and waits for the thread.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from appliance.core.config import Settings
from appliance.core.logs import get_logger
from appliance.core.store import Store
from appliance.web import accounts
from appliance.web.app import create_app
from appliance.web.metrics import ApplianceMetrics
from appliance.web.ports import WebPorts
from appliance.web.security import throttle_key
from appliance.web.tls import certificate_files, fingerprint

log = get_logger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
IDLE_CLOSE_S = 10.0  # a connection with no request in progress this long is closed (slow or absent headers)
REQUEST_DEADLINE_S = 10.0  # a request's header and body must both arrive within this of its first byte
MAX_CONNECTIONS = 64  # uvicorn's limit_concurrency: beyond it every request gets 503
MAX_CONNECTIONS_PER_ADDRESS = 16  # one host (an IPv6 one: its /64) holds at most this many of them
_IDLE_CHECK_S = 1.0


class _DeadlineHTTP(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP/1.1 protocol (httptools, else h11) with the deadlines and the per-address share uvicorn
    lacks (it has only ``timeout_keep_alive``, which stops at a next request's first byte, and a global
    ``limit_concurrency``), so that stalled or hoarding clients cannot take every connection slot:

    - **idle**: a connection with no request in progress for ``IDLE_CLOSE_S`` (since it was opened or its last
      response ended) is closed;
    - **whole request**: once a request's first byte has arrived, its header *and* body must be complete within
      ``REQUEST_DEADLINE_S``, however the bytes trickle (slowloris headers, a login body sent a byte every 3 s);
      otherwise the connection is closed and the handler waiting for the body sees a disconnect. Checked every
      ``_IDLE_CHECK_S``. A request whose body has arrived is being handled and is never cut;
    - **per address**: a new connection from an address that already holds ``MAX_CONNECTIONS_PER_ADDRESS``
      (an IPv6 client counted by its /64, :func:`appliance.web.security.throttle_key`) is closed at once, so one
      host fills at most a quarter of ``MAX_CONNECTIONS``.
    """

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._idle_timer: asyncio.TimerHandle | None = None
        self._request_since: float | None = None  # first byte of the request in progress
        self._address_key = throttle_key(self.client[0] if self.client else None)
        same = sum(1 for c in self.connections if getattr(c, "_address_key", None) == self._address_key)
        if same > MAX_CONNECTIONS_PER_ADDRESS:
            transport.close()
            return
        self._idle_since = self.loop.time()
        self._idle_timer = self.loop.call_later(_IDLE_CHECK_S, self._idle_check)

    def data_received(self, data: bytes) -> None:
        if self._request_since is None:
            self._request_since = self.loop.time()
        super().data_received(data)

    def _idle_check(self) -> None:
        now = self.loop.time()
        cycle = self.cycle
        started = self._request_since
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            self._idle_since = now  # the whole request arrived: it is being handled
        elif started is not None and now - started >= REQUEST_DEADLINE_S:
            self.transport.close()  # header or body still incomplete past the deadline
            return
        elif started is None and now - self._idle_since >= IDLE_CLOSE_S:
            self.transport.close()
            return
        self._idle_timer = self.loop.call_later(_IDLE_CHECK_S, self._idle_check)

    def on_response_complete(self) -> None:
        self._idle_since = self.loop.time()
        self._request_since = None
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_idle_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the daemon's main thread owns SIGTERM/SIGINT (older uvicorn)
        return None


class WebService:
    """The dashboard/API service (``name``, ``start()``, ``stop()``, ``status()``)."""

    name = "web"

    def __init__(self, settings: Settings, store: Store, ports: WebPorts, metrics: ApplianceMetrics):
        self.settings = settings
        self.store = store
        self.ports = ports
        self.metrics = metrics
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._address: tuple[str, int] = (settings.api.bind, settings.api.port)
        self._fingerprint = ""
        self._self_signed = False

    def start(self) -> None:
        """Bind, load or make the certificate, serve; raises OSError (address in use, unreadable certificate)
        or RuntimeError (uvicorn did not come up within ``START_TIMEOUT_S``)."""
        api = self.settings.api
        cert, key, self._self_signed = certificate_files(self.settings)
        self._fingerprint = fingerprint(cert.read_bytes())
        family = socket.AF_INET6 if ":" in api.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((api.bind, api.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._address = sock.getsockname()[:2]
        app = create_app(self.settings, self.store, self.ports, self.metrics)
        config = uvicorn.Config(
            app,
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
            log_config=None,  # the daemon's logging configuration applies
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_keep_alive=5,
            http=_DeadlineHTTP,  # idle and whole-request deadlines, per-address share (slowloris, slow bodies)
            limit_concurrency=MAX_CONNECTIONS,
            lifespan="off",
        )
        server = _Server(config)
        self._server = server

        def serve() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except Exception:
                log.exception("web server stopped with an error")
            finally:
                sock.close()

        self._thread = threading.Thread(target=serve, name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"web server did not start on {api.bind}:{api.port}")
            time.sleep(0.02)
        users = accounts.has_users(self.store)
        log.info(
            "web dashboard serving",
            url=self.url,
            certificate_sha256=self._fingerprint,
            self_signed=self._self_signed,
        )
        if not users:
            log.warning("no dashboard user yet: make one with `appliance user add NAME --role admin`")

    @property
    def url(self) -> str:
        host, port = self._address
        shown = "localhost" if host in ("127.0.0.1", "::1") else host
        return f"https://{'[' + shown + ']' if ':' in shown else shown}:{port}/"

    def status(self) -> dict[str, Any]:
        """Where the dashboard listens (the real port when configured 0) and the certificate's fingerprint."""
        host, port = self._address
        return {
            "host": host,
            "port": port,
            "url": self.url,
            "certificate_sha256": self._fingerprint,
            "self_signed": self._self_signed,
        }

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=STOP_TIMEOUT_S)
            if thread.is_alive():
                if server is not None:
                    server.force_exit = True
                thread.join(timeout=STOP_TIMEOUT_S)
        self._server = None
        self._thread = None
        log.info("web dashboard stopped")
