"""DICOM receive against the real daemon, driven by dcmtk's storescu/echoscu (and pynetdicom for raw bytes)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from daemon_tools import (
    appliance_cli,
    daemon_env,
    dcmtk_env,
    echoscu,
    running_daemon,
    start_daemon,
    storescu,
    storescu_results,
    wait_until,
)
from dicom_tools import dataset_bytes, file_dataset_offset, make_instance, part10, write_series
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/storescu"), reason="dcmtk (storescu) not installed")

QUIET = {"APPLIANCE_DICOM__QUIET_SECONDS": "0.5"}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _spool_file(d, row) -> Path:
    return d.home / "spool" / row["path"]


def _testdata(name: str) -> Path:
    return next(Path(f) for f in get_testdata_files() if Path(f).name == name)


def test_echo_status_and_studies_while_running(home: Path) -> None:
    with running_daemon(home) as d:
        r = echoscu(d.port)
        assert r.returncode == 0 and "Received Echo Response (Success)" in r.stdout, r.stdout
        st = d.cli("status", "--json")
        assert st.returncode == 0, st.stderr
        doc = json.loads(st.stdout)
        assert doc["running"] is True and doc["pid"] == d.proc.pid
        assert (doc["dicom"]["host"], doc["dicom"]["port"]) == ("127.0.0.1", d.port)
        assert doc["studies"]["received"] == 0 and doc["disk"]["free_bytes"] > 0
        assert f"port={d.port}" in d.logs()  # the listening address is logged
        human = d.cli("status")
        assert human.returncode == 0 and "running" in human.stdout and str(d.port) in human.stdout
        assert json.loads(d.cli("studies", "--json").stdout) == []
    st = appliance_cli(home, "status", "--json")
    assert json.loads(st.stdout)["running"] is False


# --- every bundled pydicom file: byte-identical to what storescu sent, recorded once ----------------------

# storescu proposes a compressed transfer syntax only when told to; -R proposes only what the files need.
_TS_FLAG = {
    "1.2.840.10008.1.2": [],
    "1.2.840.10008.1.2.1": [],
    "1.2.840.10008.1.2.2": [],
    "1.2.840.10008.1.2.1.99": ["-xd"],
    "1.2.840.10008.1.2.4.50": ["-xy"],
    "1.2.840.10008.1.2.4.51": ["-xx"],
    "1.2.840.10008.1.2.4.70": ["-xs"],
    "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.81": ["-xu"],
    "1.2.840.10008.1.2.4.90": ["-xv"],
    "1.2.840.10008.1.2.4.91": ["-xw"],
    "1.2.840.10008.1.2.5": ["-xr"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _corpus_by_ts() -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for f in get_testdata_files():
        p = Path(f)
        if not p.is_file():
            continue
        try:
            ds = dcmread(p, stop_before_pixels=True)
            ts = str(ds.file_meta.TransferSyntaxUID)
        except Exception:
            continue  # not a Part-10 file with a transfer syntax: storescu skips it too
        if ts in _TS_FLAG:
            groups[ts].append(p)
    return groups


def _received_set(files: list[Path]) -> dict[tuple[str, str], str]:
    out = {}
    for f in files:
        data = f.read_bytes()
        ds = dcmread(f, stop_before_pixels=True)
        out[(str(ds.file_meta.MediaStorageSOPInstanceUID), _sha(dataset_bytes(data)))] = str(
            ds.file_meta.TransferSyntaxUID
        )
    return out


def test_pydicom_corpus_stored_byte_identical_and_once(home: Path, tmp_path: Path) -> None:
    """Oracle: dcmtk storescp in bit-preserving mode (+B) receives the same storescu runs; the appliance
    must hold exactly the data set bytes storescp received (file meta aside), for every instance it acked."""
    groups = _corpus_by_ts()
    oracle_dir = tmp_path / "oracle"
    oracle_dir.mkdir()
    port = _free_port()
    oracle = subprocess.Popen(
        ["/usr/bin/storescp", "+B", "+xa", "-pm", "+uf", "-od", str(oracle_dir), "-aet", "ORACLE", str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, what="storescp")
        for ts, files in groups.items():
            storescu(port, files, "-R", *_TS_FLAG[ts], called="ORACLE")
    finally:
        oracle.terminate()
        oracle.wait(10)
    sent = _received_set(list(oracle_dir.iterdir()))
    assert len(sent) > 80

    with running_daemon(home, env={"APPLIANCE_DICOM__ACCEPT_ALL_STORAGE": "true", **QUIET}) as d:
        answers: dict[str, str] = {}
        for ts, files in groups.items():
            answers.update(storescu_results(storescu(d.port, files, "-R", *_TS_FLAG[ts]).stdout))
        rows = d.instances()
        stored = {}
        for r in rows:
            data = _spool_file(d, r).read_bytes()
            assert _sha(data) == r["sha256"]  # the record describes the file
            stored[(r["sop_instance_uid"], _sha(dataset_bytes(data)))] = r["transfer_syntax"]
        assert len(stored) == len(rows)  # recorded exactly once
        acked = sum(1 for v in answers.values() if v == "Success")
        assert stored.keys() <= sent.keys(), "appliance holds bytes storescu never sent"
        # instances it acked but that are not distinct (same UID + bytes sent twice) are idempotent
        assert len(stored) <= acked
        missing = sent.keys() - stored.keys()
        # what the appliance lacks, it refused with a failure status and a log line (policy in header.py:
        # the corpus has instances without a Study Instance UID)
        refused = [f for f, v in answers.items() if v != "Success"]
        assert refused and set(answers.values()) == {"Success", "Error: CannotUnderstand"}
        refused_sops = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in refused}
        assert {sop for sop, _ in missing} <= refused_sops
        assert d.logs().count("instance refused: malformed") == len(refused)
        # compressed syntaxes really negotiated and stored as received
        assert {
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.91",
            "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.4.80",
        } <= set(stored.values())
        # sending everything again adds nothing
        for ts, files in groups.items():
            storescu(d.port, files, "-R", *_TS_FLAG[ts])
        assert len(d.instances()) == len(rows)
        assert d.alive()
