"""Forwarding the audit trail to the hospital's audit repository: DICOM Audit Messages over syslog/TLS.

What goes on the wire, per entry: one RFC 5424 syslog message ``<85>1 TIMESTAMP HOSTNAME appliance PROCID
IHE+RFC-3881 - BOM<AuditMessage ...>`` (PRI 85 = facility 10 security/authorization, severity 5 notice,
and MSGID ``IHE+RFC-3881``, as IHE ATNA's Record Audit Event transaction sends them; TIMESTAMP is the
entry's UTC time; MSG the DICOM Audit Message XML of :mod:`appliance.core.audit_dicom`, UTF-8 after a
BOM), framed by octet counting (``LEN SP MSG``) over TLS as RFC 5425 specifies (port 6514 by default).
The server's certificate is checked against ``[audit] ca_file`` (or the system store) and its name;
``cert_file``/``key_file`` give the box's client certificate for repositories that require one (ATNA
node authentication).

Delivery is at least once, in trail order: :class:`AuditForwarder` (a daemon service) sends the entries
after the last forwarded seq, then records that seq durably in ``<state_dir>/audit/syslog_forwarded``;
a crash between the two sends those entries again (the receiver can tell by ParticipantObjectID
``<source>/audit/<seq>``). A repository that is down or refuses TLS costs nothing but a retry at the next
pass; the trail on the box is the source of truth. Entries recorded after the forwarder stopped (the
daemon's ``appliance_stopped``, CLI actions while the daemon is down) go at its next start.
"""

from __future__ import annotations

import os
import socket
import ssl

from appliance.core import audit
from appliance.core.audit_dicom import to_dicom_audit_message
from appliance.core.background import BackgroundLoop
from appliance.core.config import AuditConfig, Settings
from appliance.core.logs import get_logger
from appliance.core.store import Store
from durable import write_atomic

log = get_logger(__name__)

FACILITY_AUTH = 10  # security/authorization messages (RFC 5424 table 1)
SEVERITY_NOTICE = 5
PRI = FACILITY_AUTH * 8 + SEVERITY_NOTICE
MSGID = "IHE+RFC-3881"
APP_NAME = "appliance"
BOM = "\ufeff"
BATCH = 100


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, at most ``limit`` characters, or NILVALUE."""
    clean = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return clean or "-"


def syslog_message(xml: str, *, timestamp: str, hostname: str, procid: str, app_name: str = APP_NAME) -> bytes:
    """One RFC 5424 message (UTF-8 bytes) carrying ``xml`` as its MSG (after a BOM), no structured data.

    ``timestamp`` is an RFC 3339 time (the trail's ``time`` is one: UTC, microseconds, ``+00:00``).
    """
    header = " ".join(
        (
            f"<{PRI}>1",
            timestamp,
            _header_field(hostname, 255),
            _header_field(app_name, 48),
            _header_field(procid, 128),
            MSGID,
            "-",
        )
    )
    return f"{header} {BOM}{xml}".encode()


def frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return f"{len(message)} ".encode("ascii") + message


def tls_context(cfg: AuditConfig) -> ssl.SSLContext:
    """Client TLS context: server certificate verified against ``cfg.ca_file`` (default: the system
    store) and its host name; the box's certificate when ``cert_file`` is set. TLS 1.2 or later.
    Raises :class:`OSError`/:class:`ssl.SSLError` for unreadable certificate files."""
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file is not None:
        ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file) if cfg.key_file else None)
    return ctx


class AuditForwarder:
    """Daemon service: sends new trail entries to ``[audit] syslog_host:syslog_port`` every
    ``[audit] forward_interval_s`` (see the module docstring for what and how)."""

    name = "audit-forward"

    def __init__(self, settings: Settings, store: Store):
        cfg = settings.audit
        if not cfg.syslog_host:
            raise ValueError("audit forwarding needs [audit] syslog_host")
        self.settings = settings
        self.store = store
        self.host: str = cfg.syslog_host
        self.port = cfg.syslog_port
        self.cursor_path = settings.state_dir / "audit" / "syslog_forwarded"
        self._hostname = cfg.source_id or socket.gethostname()
        self._ctx = tls_context(cfg)
        self._sock: ssl.SSLSocket | None = None
        self._loop = BackgroundLoop(self.name, self._pass, cfg.forward_interval_s)
        self.last_error: str | None = None

    def forwarded_seq(self) -> int:
        """The last seq the repository has taken (0 before the first)."""
        try:
            return int(self.cursor_path.read_text(encoding="ascii").strip() or 0)
        except FileNotFoundError:
            return 0

    def _connect(self) -> ssl.SSLSocket:
        if self._sock is None:
            raw = socket.create_connection((self.host, self.port), timeout=self.settings.audit.timeout_s)
            try:
                self._sock = self._ctx.wrap_socket(raw, server_hostname=self.host)
            except BaseException:
                raw.close()
                raise
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def forward_once(self) -> int:
        """Send every entry after the last forwarded one, in order; returns how many were sent.

        Raises :class:`OSError` (``ssl.SSLError`` included) when the repository cannot be reached or
        the TLS handshake fails; what was sent before the error stays recorded as forwarded."""
        sent = 0
        last = self.forwarded_seq()
        while True:
            entries = self._pending(last)
            if not entries:
                return sent
            try:
                sock = self._connect()
                for e in entries:
                    xml = to_dicom_audit_message(
                        e,
                        audit_source_id=self.settings.audit.source_id,
                        enterprise_site_id=self.settings.audit.enterprise_site_id,
                        ae_title=self.settings.dicom.ae_title,
                    )
                    msg = syslog_message(xml, timestamp=e.time, hostname=self._hostname, procid=str(os.getpid()))
                    sock.sendall(frame(msg))
                    last = e.seq
                    sent += 1
            except OSError:
                self.close()
                raise
            finally:
                if sent:
                    self._save(last)

    def _pending(self, after: int) -> list[audit.AuditEntry]:
        return audit.query(self.store, after_seq=after, limit=BATCH, newest_first=False)

    def _save(self, seq: int) -> None:
        write_atomic(self.cursor_path, f"{seq}\n".encode("ascii"), mode=0o640)

    def _pass(self) -> None:
        try:
            n = self.forward_once()
        except OSError as exc:
            if str(exc) != self.last_error:
                log.warning("audit forwarding failed; will retry", host=self.host, port=self.port, error=str(exc))
            self.last_error = str(exc)
            return
        if n:
            log.info("audit entries forwarded", host=self.host, entries=n, last_seq=self.forwarded_seq())
        self.last_error = None

    def status(self) -> dict[str, object]:
        """For ``status.json``: where to, how far, the last error (None when the last pass succeeded)."""
        return {"to": f"{self.host}:{self.port}", "forwarded_seq": self.forwarded_seq(), "error": self.last_error}

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
        self.close()
