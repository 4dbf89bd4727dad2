"""The test support itself: the unit-test guard refuses what it must, and each launcher stops what it started."""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

import pytest
from pydicom import dcmread

from testsupport.common import ROOT, port_open
from testsupport.dcmtk import have_dcmtk, storescp, storescu, storescu_results
from testsupport.dicom import write_series
from testsupport.guard import NotAUnitTest, stay_in_process
from testsupport.mosquitto import Mosquitto, have_mosquitto
from testsupport.orthanc import Orthanc, have_orthanc

# -- the guard (these tests are unmarked: they run under it) --------------------------------------------------


def test_guard_refuses_processes_in_unit_tests() -> None:
    with pytest.raises(NotAUnitTest, match="integration"):
        subprocess.run(["true"], check=True)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_guard_refuses_ip_sockets_in_unit_tests(family: int) -> None:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    try:
        socket.socket(family).close()
    except OSError:
        pytest.skip("no IPv6 on this machine")
    for call, address in (("bind", (host, 0)), ("connect", (host, 9)), ("connect_ex", (host, 9))):
        with socket.socket(family) as s, pytest.raises(NotAUnitTest, match=call):
            getattr(s, call)(address)


def test_guard_allows_socketpairs() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"ping")
        assert b.recv(4) == b"ping"


@pytest.mark.integration
def test_guard_is_off_for_integration_tests() -> None:
    assert subprocess.run(["true"], check=False).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        assert s.getsockname()[1] > 0


@pytest.mark.integration
def test_guard_spares_threads_already_running_and_catches_new_ones() -> None:
    go, results = threading.Event(), {}

    def bind(key: str) -> None:
        go.wait(10)
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
            results[key] = "bound"
        except NotAUnitTest:
            results[key] = "refused"

    earlier = threading.Thread(target=bind, args=("earlier",))
    earlier.start()
    mp = pytest.MonkeyPatch()
    try:
        stay_in_process(mp)
        later = threading.Thread(target=bind, args=("later",))
        later.start()
        go.set()
        earlier.join(10)
        later.join(10)
        with socket.socket() as s, pytest.raises(NotAUnitTest):
            s.bind(("127.0.0.1", 0))
    finally:
        mp.undo()
    assert results == {"earlier": "bound", "later": "refused"}
    with socket.socket() as s:  # undone
        s.bind(("127.0.0.1", 0))


# -- launchers: started on 127.0.0.1, stopped on exit ---------------------------------------------------------


@pytest.mark.integration
@pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed")
def test_storescp_receives_then_stops(tmp_path: Path) -> None:
    files = write_series(tmp_path / "in", 2)
    with storescp(tmp_path / "out", "+uf") as port:
        assert port_open(port)
        answers = storescu_results(storescu(port, files, called="STORESCP").stdout)
        assert list(answers.values()) == ["Success", "Success"]
    assert not port_open(port)
    got = {str(dcmread(p).SOPInstanceUID) for p in (tmp_path / "out").iterdir()}
    assert got == {str(dcmread(p).SOPInstanceUID) for p in files}


@pytest.mark.integration
@pytest.mark.skipif(not have_orthanc(), reason="Orthanc not installed")
def test_orthanc_context_manager_overrides_config_and_stops(tmp_path: Path) -> None:
    with Orthanc(tmp_path / "pacs", config={"Name": "overridden"}) as pacs:
        assert pacs.get("/system")["Name"] == "overridden"
        assert port_open(pacs.dicom_port)
        proc = pacs.proc
    assert proc is not None and proc.poll() is not None and pacs.proc is None
    assert not port_open(pacs.http_port)


@pytest.mark.integration
@pytest.mark.skipif(not have_mosquitto(), reason="mosquitto not installed")
def test_mosquitto_context_manager_listens_then_stops(tmp_path: Path, pki: dict[str, Path]) -> None:
    with Mosquitto(tmp_path, pki["ca"], pki["server_crt"], pki["server_key"]) as broker:
        assert port_open(broker.port)
        proc = broker.proc
    assert proc is not None and proc.poll() is not None
    assert not port_open(broker.port)


@pytest.mark.integration
def test_azurite_reports_its_ephemeral_port_serves_https_then_stops(tmp_path: Path, pki: dict[str, Path]) -> None:
    from azure.storage.blob import BlobServiceClient

    from testsupport.azurite import Azurite, azurite_binary

    assert azurite_binary() is not None, "azurite-blob missing: ./bootstrap.sh test installs it (npm)"
    with Azurite(tmp_path / "az", cert=pki["server_crt"], key=pki["server_key"]) as az:
        assert az.port > 0 and port_open(az.port)
        assert az.blob_endpoint.startswith("https://127.0.0.1:")
        svc = BlobServiceClient.from_connection_string(az.connection_string, connection_verify=str(pki["ca"]))
        svc.create_container("box").upload_blob("x", b"hello")
        assert svc.get_blob_client("box", "x").download_blob().readall() == b"hello"
        proc = az.proc
    assert proc is not None and proc.poll() is not None and az.proc is None
    assert not port_open(az.port)


def test_benchmarks_import_the_support_package_never_the_tests() -> None:
    """bench/ shares launchers with tests through testsupport/; an import of tests/ would make a benchmark
    depend on test modules (and their fixtures) again."""
    import ast

    offenders = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n == "tests" or n.startswith("tests.")]
    assert offenders == []
