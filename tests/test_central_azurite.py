"""`appliance central repo ...` against Azurite (Blob Storage emulator) over HTTPS, read back by TUF's client.

The client is ``tuf.ngclient.Updater`` with a urllib3 fetcher trusting the test CA (urllib3 is what TUF's own
fetcher and the box's use), pointed at the container's blob URL exactly as a box in the field would be.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3
from tuf.api import exceptions
from tuf.ngclient import FetcherInterface, Updater

from appliance.updates import layout
from engines.keys import write_public_key
from testsupport.azurite import Azurite, azurite_binary
from testsupport.bundles import make_bundle, new_key
from testsupport.common import PYTHON, ROOT
from testsupport.daemon import daemon_env

pytestmark = pytest.mark.integration


class CaFetcher(FetcherInterface):
    """HTTPS GETs verified against one CA file."""

    def __init__(self, ca: Path):
        self.pool = urllib3.PoolManager(ca_certs=str(ca), cert_reqs="CERT_REQUIRED", retries=False)
        self.requests: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.requests.append(url)
        resp = self.pool.request("GET", url, preload_content=False, timeout=30)
        if resp.status >= 400:
            resp.release_conn()
            raise exceptions.DownloadHTTPError(f"HTTP {resp.status} for {url}", resp.status)
        return resp.stream(1 << 16)


@pytest.fixture
def azurite(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Azurite]:
    if azurite_binary() is None:
        pytest.fail("azurite-blob not installed: run ./bootstrap.sh test (npm install) or set AZURITE_BLOB")
    with Azurite(tmp_path / "azurite", cert=pki["server_crt"], key=pki["server_key"]) as az:
        yield az


def central(az: Azurite, pki: dict[str, Path], *args: str) -> subprocess.CompletedProcess:
    env = daemon_env(
        {
            "APPLIANCE_CENTRAL_BLOB_CONNECTION_STRING": az.connection_string,
            "APPLIANCE_CENTRAL_BLOB_CA_FILE": str(pki["ca"]),
            "APPLIANCE_ENGINES__TRUST_DEMO_KEY": "false",
        }
    )
    return subprocess.run(
        [PYTHON, "-m", "appliance", "central", "repo", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def updater(tmp: Path, az: Azurite, pki: dict[str, Path], root: bytes) -> tuple[Updater, CaFetcher]:
    base = f"{az.blob_endpoint}/{layout.DEFAULT_CONTAINER}/"
    (tmp / "meta").mkdir(parents=True, exist_ok=True)
    (tmp / "dl").mkdir(parents=True, exist_ok=True)
    fetcher = CaFetcher(pki["ca"])
    up = Updater(
        str(tmp / "meta"),
        base + layout.METADATA_PREFIX,
        str(tmp / "dl"),
        base + layout.TARGETS_PREFIX,
        fetcher=fetcher,
        bootstrap=root,
    )
    return up, fetcher


def test_cli_publishes_to_azurite_and_tuf_client_downloads_over_https(tmp_path: Path, azurite, pki) -> None:
    key = new_key()
    write_public_key(key, tmp_path / "signer.pub")
    b1 = make_bundle(tmp_path, key, bundle_id="cxr", version="1.0.0")
    b2 = make_bundle(tmp_path, key, bundle_id="cxr", version="1.1.0", gain=2.0)
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    common = ["--repo", str(repo), "--keys", str(keys)]
    r = central(azurite, pki, "init", *common, "--public-read", "--expiry", "timestamp=6h")
    assert r.returncode == 0, r.stderr
    root = (repo / "metadata" / "1.root.json").read_bytes()
    for b in (b1, b2):
        r = central(azurite, pki, "publish", str(b), *common, "--trusted-key", str(tmp_path / "signer.pub"))
        assert r.returncode == 0, r.stderr
        published = json.loads(r.stdout.splitlines()[0])
        assert published["target"] == layout.target_path("cxr", b.stem.split("-", 1)[1])
        assert json.loads(r.stdout.splitlines()[-1])["uploaded"] >= 4  # target, targets, snapshot, timestamp

    up, fetcher = updater(tmp_path / "box", azurite, pki, root)
    up.refresh()
    for b in (b1, b2):
        version = b.stem.split("-", 1)[1]
        info = up.get_targetinfo(layout.target_path("cxr", version))
        assert info is not None and info.custom["version"] == version
        assert Path(up.download_target(info)).read_bytes() == b.read_bytes()
    assert all(u.startswith("https://127.0.0.1:") for u in fetcher.requests)
    assert any(f"/targets/cxr/{info.hashes['sha256']}.cxr-1.1.0.bundle" in u for u in fetcher.requests)

    # blob properties: metadata never cached, targets immutable
    from azure.storage.blob import ContainerClient

    cc = ContainerClient.from_connection_string(
        azurite.connection_string, layout.DEFAULT_CONTAINER, connection_verify=str(pki["ca"])
    )
    ts = cc.get_blob_client("metadata/timestamp.json").get_blob_properties()
    assert (ts.content_settings.content_type, ts.content_settings.cache_control) == ("application/json", "no-cache")
    target = next(b for b in cc.list_blobs(name_starts_with="targets/cxr/") if b.name.endswith("cxr-1.1.0.bundle"))
    props = cc.get_blob_client(target.name).get_blob_properties()
    assert "immutable" in props.content_settings.cache_control

    # rotate every key and refresh; a box holding only 1.root.json walks the chain and still downloads
    for role in ("root", "targets", "snapshot", "timestamp"):
        r = central(azurite, pki, "rotate-key", role, *common)
        assert r.returncode == 0, r.stderr
    r = central(azurite, pki, "refresh", *common)
    assert r.returncode == 0, r.stderr
    up, _ = updater(tmp_path / "box2", azurite, pki, root)
    up.refresh()
    assert json.loads((tmp_path / "box2" / "meta" / "root.json").read_bytes())["signed"]["version"] == 5
    info = up.get_targetinfo(layout.target_path("cxr", "1.1.0"))
    assert info is not None and Path(up.download_target(info)).read_bytes() == b2.read_bytes()


def test_cli_refuses_bad_bundles_and_missing_keys(tmp_path: Path, azurite, pki) -> None:
    key = new_key()
    write_public_key(key, tmp_path / "signer.pub")
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    common = ["--repo", str(repo), "--keys", str(keys)]
    assert central(azurite, pki, "init", *common, "--public-read").returncode == 0
    trusted = ["--trusted-key", str(tmp_path / "signer.pub")]
    unsigned = make_bundle(tmp_path, None, bundle_id="cxr", version="1.0.0")
    r = central(azurite, pki, "publish", str(unsigned), *common, *trusted)
    assert r.returncode == 1 and "bundle verification failed" in r.stderr and "unsigned" in r.stderr
    other = make_bundle(tmp_path / "o", new_key(), bundle_id="cxr", version="1.0.0")
    r = central(azurite, pki, "publish", str(other), *common, *trusted)
    assert r.returncode == 1 and "unknown_key" in r.stderr
    # the demo key is not trusted here (config says so); nothing was added or uploaded
    from azure.storage.blob import ContainerClient

    cc = ContainerClient.from_connection_string(
        azurite.connection_string, layout.DEFAULT_CONTAINER, connection_verify=str(pki["ca"])
    )
    assert not [b.name for b in cc.list_blobs(name_starts_with="targets/")]
    assert sorted(b.name for b in cc.list_blobs(name_starts_with="metadata/")) == [
        "metadata/1.root.json",
        "metadata/1.snapshot.json",
        "metadata/1.targets.json",
        "metadata/timestamp.json",
    ]
    # the root key kept offline: rotation is refused with the reason, nothing written
    for pem in (keys / "root").glob("*.pem"):
        pem.rename(tmp_path / pem.name)
    r = central(azurite, pki, "rotate-key", "targets", *common)
    assert r.returncode == 1 and "role root needs 1 of its keys" in r.stderr and "missing:" in r.stderr
    assert sorted(p.name for p in (repo / "metadata").iterdir()) == [
        "1.root.json",
        "1.snapshot.json",
        "1.targets.json",
        "timestamp.json",
    ]
    r = central(azurite, pki, "init", *common)
    assert r.returncode == 1 and "already holds a repository" in r.stderr
    r = central(azurite, pki, "init", "--repo", str(tmp_path / "r2"), "--keys", str(keys), "--threshold", "boss=2")
    assert r.returncode == 2 and "ROLE=N" in r.stderr
