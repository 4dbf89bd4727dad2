"""Start a real Mosquitto broker with TLS client certificates on an ephemeral port (tests and bench)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from testsupport.common import HOST, free_port

MOSQUITTO = "/usr/sbin/mosquitto"


def have_mosquitto() -> bool:
    """True when Mosquitto is installed (``apt-get install mosquitto``)."""
    return os.path.exists(MOSQUITTO)


class Mosquitto:
    """Mosquitto with ``require_certificate`` and the certificate CN as the client identity.

    Run as root, Mosquitto drops privileges to the ``mosquitto`` user and then cannot read 0600 key files
    owned by root; ``user root`` in the config keeps it as root (tests only; never on the appliance).
    ``ca`` signs the client certificates it accepts; ``cert``/``key`` are its server certificate. Listens on
    127.0.0.1 and ``port`` (default: a free one); not started until :meth:`start` or ``with``.
    """

    def __init__(self, workdir: Path, ca: Path, cert: Path, key: Path, port: int | None = None):
        self.dir = workdir
        self.port = port or free_port()
        self.conf = workdir / "mosquitto.conf"
        (workdir / "persist").mkdir(exist_ok=True)
        self.conf.write_text(
            "\n".join(
                [
                    "user root",
                    f"listener {self.port} {HOST}",
                    f"cafile {ca}",
                    f"certfile {cert}",
                    f"keyfile {key}",
                    "require_certificate true",
                    "use_identity_as_username true",
                    "tls_version tlsv1.2",
                    "allow_anonymous false",
                    "persistence true",
                    f"persistence_location {workdir / 'persist'}/",
                    "max_queued_messages 100000",
                    "max_inflight_messages 100",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                ]
            )
            + "\n"
        )
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start it and return once it accepts TCP connections; RuntimeError if it exits or never listens."""
        with open(self.dir / "mosquitto.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self.dir / 'mosquitto.log').read_text()[-2000:]}")
            try:
                socket.create_connection((HOST, self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        """Terminate it (persistence stays in the work directory for a restart on the same port)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
