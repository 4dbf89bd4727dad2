"""A real Orthanc (Debian's /usr/sbin/Orthanc) as the clinic PACS in tests.

Started with a generated JSON config: temp storage, ephemeral HTTP and DICOM ports on 127.0.0.1, no remote
access, no auth, the appliance's AE in ``DicomModalities``. ``reject=True`` makes it refuse the appliance:
its AE is left out of ``DicomModalities`` and ``DicomAlwaysAllowStore`` is off (Orthanc 1.10's Lua
``ReceivedInstanceFilter`` drops instances but still answers success, so it cannot model a refusal).
Restarting on the same storage and ports models "the PACS comes back".
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
AET = "TESTPACS"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, workdir: Path, appliance_aet: str = "APPLIANCE", reject: bool = False):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.appliance_aet = appliance_aet
        self.reject = reject
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _config(self) -> Path:
        cfg = {
            "Name": "test-pacs",
            "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomModalities": {} if self.reject else {"appliance": [self.appliance_aet, "127.0.0.1", 104]},
            "DicomAlwaysAllowStore": not self.reject,
            "DicomAlwaysAllowEcho": True,
            "Plugins": [],
            "StorageCompression": False,
            "SyncStorageArea": False,
            "StableAge": 60,
            "OverwriteInstances": False,
        }
        path = self.dir / ("config-reject.json" if self.reject else "config.json")
        path.write_text(json.dumps(cfg, indent=1))
        return path

    def start(self, timeout: float = 30.0) -> Orthanc:
        cfg = self._config()
        log = open(self.dir / "orthanc.log", "ab")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.dir / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("Orthanc did not answer on REST in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, reject: bool | None = None) -> Orthanc:
        self.stop()
        if reject is not None:
            self.reject = reject
        return self.start()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            body = resp.read()
            ctype = resp.headers.get("Content-Type", "")
        return json.loads(body) if "json" in ctype else body

    def studies(self) -> list[str]:
        return self.get("/studies")

    def instances(self) -> list[str]:
        return self.get("/instances")

    def instance_tags(self, orthanc_id: str) -> dict:
        return self.get(f"/instances/{orthanc_id}/simplified-tags")

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file")

    def instances_of_study(self, study_uid: str) -> list[dict]:
        """Simplified tags of every instance of one study (by StudyInstanceUID)."""
        out = []
        for iid in self.instances():
            tags = self.instance_tags(iid)
            if tags.get("StudyInstanceUID") == study_uid:
                tags["_id"] = iid
                out.append(tags)
        return out

    def wait_for(self, predicate, timeout: float = 30.0, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        return predicate()


@pytest.fixture
def orthanc(tmp_path: Path):
    if not Path(ORTHANC).exists():
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        yield pacs
    finally:
        pacs.stop()
