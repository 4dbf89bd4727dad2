"""Start a real Mosquitto broker with TLS client certificates on an ephemeral port (tests and bench)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """Mosquitto with ``require_certificate`` and the certificate CN as the client identity.

    Run as root, Mosquitto drops privileges to the ``mosquitto`` user and then cannot read 0600 key files
    owned by root; ``user root`` in the config keeps it as root (tests only; never on the appliance).
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
                    f"listener {self.port} 127.0.0.1",
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

    def start(self) -> None:
        self.log = open(self.dir / "mosquitto.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=self.log, stderr=self.log)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self.dir / 'mosquitto.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
