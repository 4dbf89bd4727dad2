"""A real Orthanc (Debian's /usr/sbin/Orthanc) as the clinic PACS in tests and benchmarks.

Started with a generated JSON config: temp storage, ephemeral HTTP and DICOM ports on 127.0.0.1, no remote
access, no auth, the appliance's AE in ``DicomModalities``. ``reject=True`` makes it refuse the appliance:
its AE is left out of ``DicomModalities`` and ``DicomAlwaysAllowStore`` is off (Orthanc 1.10's Lua
``ReceivedInstanceFilter`` drops instances but still answers success, so it cannot model a refusal).
Restarting on the same storage and ports models "the PACS comes back"::

    with Orthanc(tmp_path / "pacs") as pacs:
        ...  # send to 127.0.0.1:pacs.dicom_port, AE title AET; read back over REST (pacs.instances())
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from testsupport.common import free_port
from testsupport.dcmtk import dcmtk_env

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
AET = "TESTPACS"
T = TypeVar("T")


def have_orthanc() -> bool:
    """True when Orthanc is installed (``apt-get install orthanc``)."""
    return Path(ORTHANC).exists()


class Orthanc:
    """One Orthanc on 127.0.0.1 with free HTTP and DICOM ports, storing under ``workdir``.

    ``config`` overrides keys of the generated configuration (e.g. ``{"SyncStorageArea": True}``).
    Not started until :meth:`start` or ``with``.
    """

    def __init__(
        self,
        workdir: Path,
        appliance_aet: str = "APPLIANCE",
        reject: bool = False,
        config: dict[str, Any] | None = None,
    ):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.appliance_aet = appliance_aet
        self.reject = reject
        self.overrides = dict(config or {})
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL of its REST API."""
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
            **self.overrides,
        }
        path = self.dir / ("config-reject.json" if self.reject else "config.json")
        path.write_text(json.dumps(cfg, indent=1))
        return path

    def start(self, timeout: float = 30.0) -> Orthanc:
        """Start it and return once its REST API answers; RuntimeError if it exits or stays silent."""
        cfg = self._config()
        with open(self.dir / "orthanc.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env())
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
        """Terminate it (SIGKILL after 10 s); its storage stays for a restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, reject: bool | None = None) -> Orthanc:
        """Stop and start on the same storage and ports, accepting or refusing the appliance anew."""
        self.stop()
        if reject is not None:
            self.reject = reject
        return self.start()

    def get(self, path: str) -> Any:
        """GET ``path`` on the REST API: parsed JSON, or the raw bytes for other content types."""
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            body = resp.read()
            ctype = resp.headers.get("Content-Type", "")
        return json.loads(body) if "json" in ctype else body

    def studies(self) -> list[str]:
        """Orthanc ids of every stored study."""
        return self.get("/studies")

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return self.get("/instances")

    def instance_tags(self, orthanc_id: str) -> dict:
        """One instance's tags, keyword -> value (Orthanc's simplified tags)."""
        return self.get(f"/instances/{orthanc_id}/simplified-tags")

    def instance_file(self, orthanc_id: str) -> bytes:
        """One instance's Part-10 file as stored."""
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

    def wait_for(self, predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.2) -> T:
        """Poll ``predicate`` until truthy; after ``timeout`` return its last value (falsy) instead of raising."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        return predicate()
