"""A TUF repository of model bundles for the box's update tests, served over real HTTP with Range and faults.

:class:`TufRepo` builds the layout of :mod:`appliance.updates.layout` in a folder with the TUF Metadata API
(``tuf.api.metadata``; one Ed25519 key per top-level role, consistent snapshots) and can stage the attacks of
the TUF specification: expired metadata (freeze), a lower timestamp version (rollback), metadata signed by a
key the root does not name. :class:`RepoServer` serves the folder on 127.0.0.1 (ephemeral port) with HTTP
Range (RFC 9110 section 14) and injects faults on chosen files: drop the connection after N bytes, send
endless data, serve other bytes. Every request is recorded (path and Range header).
"""

from __future__ import annotations

import datetime as dt
import shutil
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from appliance.updates import layout
from engines.bundle import manifest_digest, read_manifest_unverified
from engines.manifest import canonical_bytes

ROLES = ("root", "targets", "snapshot", "timestamp")


def _expiry(days: float) -> dt.datetime:
    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days)).replace(microsecond=0)


class TufRepo:
    """A TUF repository in ``directory`` (``metadata/`` and ``targets/``), published with :meth:`publish`."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.meta_dir = self.dir / layout.METADATA_PREFIX
        self.targets_dir = self.dir / layout.TARGETS_PREFIX
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        self.signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
        root = Root(expires=_expiry(365), consistent_snapshot=True)
        for role, signer in self.signers.items():
            root.add_key(signer.public_key, role)
        self.root: Metadata[Root] = Metadata(root)
        self.targets: Metadata[Targets] = Metadata(Targets(expires=_expiry(30)))
        self.snapshot: Metadata[Snapshot] = Metadata(Snapshot(expires=_expiry(7)))
        self.timestamp: Metadata[Timestamp] = Metadata(Timestamp(expires=_expiry(1)))
        self._sign_write_root()
        self.commit()

    @property
    def root_file(self) -> Path:
        """The trusted root a box ships with (version 1)."""
        return self.meta_dir / "1.root.json"

    def _sign_write_root(self) -> None:
        self.root.signatures.clear()
        self.root.sign(self.signers["root"])
        self.root.to_file(str(self.meta_dir / f"{self.root.signed.version}.root.json"))

    def commit(self, *, timestamp_expires_days: float = 1.0, targets_signer: CryptoSigner | None = None) -> None:
        """Write new targets, snapshot and timestamp versions (each signed; ``targets_signer`` replaces the
        targets key to stage a signature by a key the root does not know)."""
        self.targets.signed.version += 1
        self.targets.signatures.clear()
        self.targets.sign(targets_signer or self.signers["targets"])
        self.targets.to_file(str(self.meta_dir / f"{self.targets.signed.version}.targets.json"))
        self.snapshot.signed.version += 1
        self.snapshot.signed.meta["targets.json"] = MetaFile(version=self.targets.signed.version)
        self.snapshot.signatures.clear()
        self.snapshot.sign(self.signers["snapshot"])
        self.snapshot.to_file(str(self.meta_dir / f"{self.snapshot.signed.version}.snapshot.json"))
        self.write_timestamp(expires_days=timestamp_expires_days)

    def write_timestamp(self, *, expires_days: float = 1.0, version: int | None = None) -> None:
        """A new timestamp.json (next version, or ``version`` to stage a rollback) naming the current snapshot."""
        ts = self.timestamp.signed
        ts.version = version if version is not None else ts.version + 1
        ts.expires = _expiry(expires_days)
        ts.snapshot_meta = MetaFile(version=self.snapshot.signed.version)
        self.timestamp.signatures.clear()
        self.timestamp.sign(self.signers["timestamp"])
        self.timestamp.to_file(str(self.meta_dir / "timestamp.json"))

    def rotate_key(self, role: str) -> CryptoSigner:
        """Replace ``role``'s key with a new one in a new root version (signed by the old and the new root
        key when ``role`` is root, as TUF requires); returns the retired signer, which the box must now refuse."""
        old = self.signers[role]
        new = CryptoSigner.generate_ed25519()
        root = self.root.signed
        root.revoke_key(old.public_key.keyid, role)
        root.add_key(new.public_key, role)
        root.version += 1
        self.signers[role] = new
        self.root.signatures.clear()
        self.root.sign(new if role == "root" else self.signers["root"], append=True)
        if role == "root":
            self.root.sign(old, append=True)
        self.root.to_file(str(self.meta_dir / f"{root.version}.root.json"))
        return old

    def publish(self, bundle: Path, bundle_id: str, version: str, *, commit: bool = True, **kw: Any) -> Path:
        """Add ``bundle`` as target ``layout.target_path(bundle_id, version)``; returns the served file."""
        path = layout.target_path(bundle_id, version)
        info = TargetFile.from_file(path, str(bundle), ["sha256"])
        m = read_manifest_unverified(bundle)
        info.unrecognized_fields["custom"] = {  # as appliance.central.repository publishes it
            "bundle_id": m.bundle_id,
            "version": m.version,
            "task": m.task,
            "manifest_sha256": manifest_digest(canonical_bytes(m)),
        }
        self.targets.signed.targets[path] = info
        dirname, _, name = path.rpartition("/")
        served = self.targets_dir / dirname / f"{info.hashes['sha256']}.{name}"
        served.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle, served)
        if commit:
            self.commit(**kw)
        return served


@dataclass
class Fault:
    """What the server does for one file: ``drop_after`` bytes then close (``times`` requests), ``endless``
    data, ``body`` instead of the file, or the file trickled out slowly (``trickle_s``)."""

    drop_after: int | None = None
    times: int = 1
    endless: bool = False
    body: bytes | None = None
    trickle_s: float = 0.0  # pause after every 256 bytes (``times`` requests): a slow link


@dataclass
class RepoServer:
    """HTTP server for ``root`` on 127.0.0.1; ``faults`` maps a path suffix to a :class:`Fault`."""

    root: Path
    faults: dict[str, Fault] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    tls: tuple[Path, Path] | None = None  # (certificate, key): serve HTTPS

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                fault = next((f for k, f in server.faults.items() if self.path.endswith(k)), None)
                if fault is not None and fault.endless:
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    chunk = b"\0" * 65536
                    try:
                        while True:
                            self.wfile.write(chunk)
                    except OSError:
                        return
                target = (server.root / self.path.lstrip("/")).resolve()
                if not target.is_relative_to(server.root.resolve()) or not target.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = fault.body if fault is not None and fault.body is not None else target.read_bytes()
                start = 0
                if rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                if fault is not None and fault.drop_after is not None and fault.times > 0:
                    fault.times -= 1
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(body[: fault.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.end_headers()
                if fault is not None and fault.trickle_s > 0 and fault.times > 0:
                    fault.times -= 1
                    try:
                        for i in range(0, len(body), 256):
                            self.wfile.write(body[i : i + 256])
                            self.wfile.flush()
                            time.sleep(fault.trickle_s)
                    except OSError:  # the client went away (killed)
                        self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if self.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="repo-server", daemon=True)

    @property
    def url(self) -> str:
        """Base URL of the repository (``<url>/metadata/``, ``<url>/targets/``)."""
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> RepoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def target_requests(self) -> list[tuple[str, str | None]]:
        """Requests for target files (path, Range header)."""
        return [r for r in self.requests if "/" + layout.TARGETS_PREFIX in r[0]]
