"""A syslog-over-TLS receiver (RFC 5425 octet-counted frames) on 127.0.0.1, for audit forwarding tests.

``with SyslogTlsServer(cert, key, client_ca=None) as srv:`` listens on an ephemeral port (``srv.port``);
``srv.messages()`` are the syslog messages received so far (bytes, frame length removed), and
``srv.client_subjects`` the client certificates' common names when ``client_ca`` requires one.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from types import TracebackType
from typing import cast

from testsupport.common import HOST


class SyslogTlsServer:
    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None):
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(str(cert), str(key))
        if client_ca is not None:
            self._ctx.verify_mode = ssl.CERT_REQUIRED
            self._ctx.load_verify_locations(str(client_ca))
        self._sock = socket.create_server((HOST, 0))
        self.port: int = self._sock.getsockname()[1]
        self._lock = threading.Condition()
        self._messages: list[bytes] = []
        self.client_subjects: list[str] = []
        self.handshake_errors: list[str] = []
        self.connections = 0
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._accept = threading.Thread(target=self._serve, name="syslogd", daemon=True)

    def __enter__(self) -> SyslogTlsServer:
        self._accept.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping = True
        self._sock.close()
        self._accept.join(5)
        for t in self._threads:
            t.join(5)

    def messages(self) -> list[bytes]:
        with self._lock:
            return list(self._messages)

    def _serve(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._client, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _client(self, raw: socket.socket) -> None:
        raw.settimeout(30)
        try:
            conn = self._ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.handshake_errors.append(str(exc))
            raw.close()
            return
        with conn:
            self.connections += 1
            peer = conn.getpeercert()
            if peer:
                subject = cast(tuple[tuple[tuple[str, str], ...], ...], peer["subject"])
                names = [attr for rdn in subject for attr in rdn]
                self.client_subjects += [str(value) for key, value in names if key == "commonName"]
            buf = b""
            while True:
                try:
                    chunk = conn.recv(65536)
                except (ssl.SSLError, OSError):
                    return
                if not chunk:
                    return
                buf += chunk
                while b" " in buf:
                    length, _, rest = buf.partition(b" ")
                    if not length.isdigit():
                        raise ValueError(f"not an octet-counted frame: {buf[:40]!r}")
                    n = int(length)
                    if len(rest) < n:
                        break
                    with self._lock:
                        self._messages.append(rest[:n])
                        self._lock.notify_all()
                    buf = rest[n:]
