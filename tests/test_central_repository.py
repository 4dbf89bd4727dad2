"""The central team's TUF repository (appliance/central/repository.py), read back by TUF's own client.

The client here is ``tuf.ngclient.Updater`` with a fetcher that reads the repository folder in-process; the
HTTP(S) path through Azurite is in tests/test_central_azurite.py.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.exceptions import DownloadHTTPError, ExpiredMetadataError
from tuf.ngclient import FetcherInterface, Updater

from appliance.central import repository as R
from appliance.updates import layout
from testsupport.bundles import make_bundle, new_key, trust_for
from testsupport.tufrepo import make_repository

pytestmark = pytest.mark.unit


class FolderFetcher(FetcherInterface):
    """Serves ``http://repo/<path>`` from a folder, as a static web server (or Blob Storage) would."""

    def __init__(self, root: Path):
        self.root = root

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = self.root / url.split("http://repo/", 1)[1]
        if not path.is_file():
            raise DownloadHTTPError(f"{url} not found", 404)
        return iter([path.read_bytes()])


def client(tmp: Path, repo_dir: Path, root: bytes) -> Updater:
    """A fresh box-side TUF client trusting ``root``."""
    meta, dl = tmp / "client-meta", tmp / "client-dl"
    meta.mkdir(parents=True, exist_ok=True)
    dl.mkdir(parents=True, exist_ok=True)
    return Updater(
        str(meta),
        "http://repo/metadata/",
        str(dl),
        "http://repo/targets/",
        fetcher=FolderFetcher(repo_dir),
        bootstrap=root,
    )


@pytest.fixture
def key():
    return new_key()


def test_init_writes_tuf_layout_with_private_keys_0600(tmp_path: Path) -> None:
    repo = R.init(tmp_path / "repo", tmp_path / "keys", threshold={"root": 2}, keys={"root": 3})
    names = sorted(p.name for p in repo.metadata_dir.iterdir())
    assert names == ["1.root.json", "1.snapshot.json", "1.targets.json", "timestamp.json"]
    root = repo.root().signed
    assert root.consistent_snapshot is True
    assert root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 3
    pems = sorted((tmp_path / "keys" / "root").glob("*.pem"))
    assert [p.stem for p in pems] == sorted(root.roles["root"].keyids)
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in pems)
    assert len(repo.root().signatures) == 3
    with pytest.raises(R.RepositoryError, match="already holds a repository"):
        R.init(tmp_path / "repo", tmp_path / "keys2")


def test_impossible_threshold_refused(tmp_path: Path) -> None:
    with pytest.raises(R.RepositoryError, match="threshold 2 with 1 keys"):
        R.init(tmp_path / "repo", tmp_path / "keys", threshold={"targets": 2}, keys={"targets": 1})
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"expiry": {"timestamp": dt.timedelta(days=3_000_000)}},  # past year 9999: OverflowError while signing
        {"expiry": {"root": dt.timedelta(days=100 * 365)}},  # a root that outlives every key rotation plan
        {"threshold": {"root": 10**9}},  # would generate a billion keys
        {"keys": {"snapshot": 10**6}},
    ],
    ids=["expiry-past-9999", "expiry-100-years", "threshold-1e9", "keys-1e6"],
)
def test_absurd_init_arguments_refused_before_anything_is_written(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(R.RepositoryError, match="at most"):
        R.init(tmp_path / "repo", tmp_path / "keys", **kwargs)
    assert not (tmp_path / "repo").exists() and not (tmp_path / "keys").exists()


@pytest.mark.parametrize("text", ["99999999999d", "1" + "0" * 400 + "s", "3700d"])
def test_cli_duration_refuses_what_no_metadata_should_live(text: str) -> None:
    from appliance.cli.central_updates_cmds import _duration

    with pytest.raises(ValueError, match="at most"):
        _duration(text)


def test_published_versions_download_through_tuf_client(tmp_path: Path, key) -> None:
    b1 = make_bundle(tmp_path, key, version="1.0.0")
    b2 = make_bundle(tmp_path, key, version="1.1.0")
    h = make_repository(tmp_path, [b1, b2], trust=trust_for(key))
    assert h.repo.targets().signed.version == 3  # init + two publishes
    assert h.repo.timestamp().signed.version == 3
    up = client(tmp_path, h.repo_dir, h.root_path.read_bytes())
    up.refresh()
    info = up.get_targetinfo(layout.target_path("tiny", "1.1.0"))
    assert info is not None
    assert info.custom["version"] == "1.1.0" and info.custom["task"] == "cxr"
    assert info.length == b2.stat().st_size
    got = Path(up.download_target(info))
    assert got.read_bytes() == b2.read_bytes()
    # consistent snapshot: the file on "the server" is targets/<id>/<sha256>.<name>
    assert h.repo.target_file(info.path).name == f"{info.hashes['sha256']}.tiny-1.1.0.bundle"


def test_republishing_same_bytes_is_noop_other_bytes_refused(tmp_path: Path, key) -> None:
    b1 = make_bundle(tmp_path, key, version="1.0.0")
    h = make_repository(tmp_path, [b1], trust=trust_for(key))
    before = h.repo.targets().signed.version
    h.publish(b1)
    assert h.repo.targets().signed.version == before
    other = make_bundle(tmp_path / "other", key, version="1.0.0", gain=2.0)
    with pytest.raises(R.RepositoryError, match="already published with other content"):
        h.publish(other)
    assert h.repo.targets().signed.version == before


def _tamper(bundle: Path, out: Path) -> Path:
    """Rewrite ``bundle`` with model.onnx changed by one byte (manifest and signature unchanged)."""
    with tarfile.open(bundle) as src, tarfile.open(out, "w:gz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == "model.onnx":
                data = data[:-1] + bytes([data[-1] ^ 1])
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    return out


@pytest.mark.parametrize(
    ("case", "reason"),
    [("unsigned", "unsigned"), ("tampered", "hash_mismatch"), ("unknown_key", "unknown_key"), ("revoked", "revoked")],
)
def test_bad_bundles_refused_and_repository_unchanged(tmp_path: Path, key, case: str, reason: str) -> None:
    h = make_repository(tmp_path, trust=trust_for(key))
    if case == "unsigned":
        bad = make_bundle(tmp_path, None, version="2.0.0")
    elif case == "tampered":
        bad = _tamper(make_bundle(tmp_path, key, version="2.0.0"), tmp_path / "tampered.bundle")
    elif case == "unknown_key":
        bad = make_bundle(tmp_path, new_key(), version="2.0.0")
    else:
        from engines.keys import key_id

        h.trust = trust_for(key, revoked=(key_id(key),))
        bad = make_bundle(tmp_path, key, version="2.0.0")
    snapshot = sorted(p.name for p in h.metadata_dir.iterdir())
    with pytest.raises(R.RepositoryError, match=f"bundle verification failed.*{reason}"):
        h.publish(bad)
    assert sorted(p.name for p in h.metadata_dir.iterdir()) == snapshot
    assert not any(p.is_file() for p in h.targets_dir.rglob("*"))


def test_root_rotation_chain_accepted_by_client_with_old_root(tmp_path: Path, key) -> None:
    h = make_repository(tmp_path, [make_bundle(tmp_path, key)], trust=trust_for(key))
    first_root = h.root_path.read_bytes()
    old_root_key = h.repo.root().signed.roles["root"].keyids[0]
    new_root_key = h.repo.rotate_key("root")
    h.repo.rotate_key("targets")
    h.repo.rotate_key("snapshot")
    h.repo.rotate_key("timestamp")
    assert h.repo.root_version() == 5
    two = json.loads((h.metadata_dir / "2.root.json").read_bytes())
    assert set(two["signatures"][i]["keyid"] for i in range(2)) == {old_root_key, new_root_key}
    assert (h.keys_dir / "root" / "retired" / f"{old_root_key}.pem").is_file()
    h.publish(make_bundle(tmp_path, key, version="1.2.0"))
    up = client(tmp_path, h.repo_dir, first_root)
    up.refresh()
    trusted = json.loads((tmp_path / "client-meta" / "root.json").read_bytes())
    assert trusted["signed"]["version"] == 5
    info = up.get_targetinfo(layout.target_path("tiny", "1.2.0"))
    assert info is not None and Path(up.download_target(info)).stat().st_size == info.length


def test_root_signed_only_by_new_key_is_refused_by_client(tmp_path: Path, key) -> None:
    """The chain matters: a 2.root.json lacking the old root key's signature is not accepted."""
    h = make_repository(tmp_path, trust=trust_for(key))
    first_root = h.root_path.read_bytes()
    h.repo.rotate_key("root")
    doc = json.loads((h.metadata_dir / "2.root.json").read_bytes())
    old = json.loads(first_root)["signed"]["roles"]["root"]["keyids"][0]
    doc["signatures"] = [s for s in doc["signatures"] if s["keyid"] != old]
    (h.metadata_dir / "2.root.json").write_text(json.dumps(doc))
    from tuf.api.exceptions import UnsignedMetadataError

    with pytest.raises(UnsignedMetadataError):
        client(tmp_path, h.repo_dir, first_root).refresh()


def test_rotate_with_missing_key_refused_and_nothing_written(tmp_path: Path, key) -> None:
    h = make_repository(tmp_path, trust=trust_for(key))
    root_key = h.repo.root().signed.roles["root"].keyids[0]
    os.rename(h.keys_dir / "root" / f"{root_key}.pem", tmp_path / "offline.pem")
    before = sorted(p.name for p in h.metadata_dir.iterdir())
    keys_before = sorted(p.name for p in h.keys_dir.rglob("*.pem"))
    with pytest.raises(R.RepositoryError, match=f"role root needs 1 of its keys.*missing: {root_key}"):
        h.repo.rotate_key("targets")
    with pytest.raises(R.RepositoryError, match="role root needs 1"):
        h.repo.rotate_key("root")
    assert sorted(p.name for p in h.metadata_dir.iterdir()) == before
    assert sorted(p.name for p in h.keys_dir.rglob("*.pem")) == keys_before
    with pytest.raises(R.RepositoryError, match="not a key of targets"):
        h.repo.rotate_key("targets", "00" * 32)
    # root present but the snapshot key (re-signed after a targets rotation) missing: refused before any write
    os.rename(tmp_path / "offline.pem", h.keys_dir / "root" / f"{root_key}.pem")
    snapshot_keys = {p.name for p in (h.keys_dir / "snapshot").glob("*.pem")}
    for name in snapshot_keys:
        (h.keys_dir / "snapshot" / name).unlink()
    keys_now = sorted(p.name for p in h.keys_dir.rglob("*.pem"))
    with pytest.raises(R.RepositoryError, match="role snapshot needs 1"):
        h.repo.rotate_key("targets")
    assert sorted(p.name for p in h.metadata_dir.iterdir()) == before
    assert sorted(p.name for p in h.keys_dir.rglob("*.pem")) == keys_now  # no new key left behind either


def test_publish_without_targets_key_refused_clearly(tmp_path: Path, key) -> None:
    h = make_repository(tmp_path, trust=trust_for(key))
    for p in (h.keys_dir / "targets").glob("*.pem"):
        p.unlink()
    with pytest.raises(R.RepositoryError, match="role targets needs 1 of its keys"):
        h.publish(make_bundle(tmp_path, key))
    assert not any(p.is_file() for p in h.targets_dir.rglob("*"))


def test_expired_timestamp_refused_by_client_until_refreshed(tmp_path: Path, key) -> None:
    h = make_repository(
        tmp_path, [make_bundle(tmp_path, key)], trust=trust_for(key), expiry={"timestamp": dt.timedelta(seconds=1)}
    )
    expires = h.repo.timestamp().signed.expires
    while dt.datetime.now(dt.timezone.utc) <= expires:
        time.sleep(0.2)
    with pytest.raises(ExpiredMetadataError, match="timestamp"):
        client(tmp_path / "a", h.repo_dir, h.root_path.read_bytes()).refresh()
    # refresh with a normal lifetime: boxes accept the repository again
    (h.repo_dir / R.CONFIG_FILE).write_text(
        json.dumps({"expiry_s": {"root": 86400, "targets": 86400, "snapshot": 86400, "timestamp": 3600}})
    )
    repo = R.Repository(h.repo_dir, h.keys_dir)
    assert repo.refresh_timestamp() == h.repo.timestamp().signed.version
    client(tmp_path / "b", h.repo_dir, h.root_path.read_bytes()).refresh()


def test_open_missing_repository_is_clear(tmp_path: Path) -> None:
    with pytest.raises(R.RepositoryError, match="is not a repository"):
        R.Repository(tmp_path / "nothing", tmp_path / "keys")


def test_refresh_resigns_what_is_past_half_its_lifetime(tmp_path: Path, key) -> None:
    h = make_repository(
        tmp_path,
        [make_bundle(tmp_path, key)],
        trust=trust_for(key),
        expiry={"snapshot": dt.timedelta(seconds=4), "targets": dt.timedelta(days=90)},
    )
    t0, s0, ts0 = (h.repo.targets().signed.version, h.repo.snapshot().signed.version, h.repo.timestamp().signed.version)
    assert h.repo.refresh() == {"timestamp": ts0 + 1}  # all young: only the timestamp
    half = h.repo.snapshot().signed.expires - dt.timedelta(seconds=1)  # well past half of 4 s
    while dt.datetime.now(dt.timezone.utc) <= half:
        time.sleep(0.2)
    assert h.repo.refresh() == {"snapshot": s0 + 1, "timestamp": ts0 + 2}
    assert h.repo.targets().signed.version == t0
    up = client(tmp_path, h.repo_dir, h.root_path.read_bytes())
    up.refresh()
    assert up.get_targetinfo(layout.target_path("tiny", "1.0.0")) is not None
    long = make_repository(tmp_path / "long", trust=trust_for(key))
    v = long.repo.timestamp().signed.version
    assert long.repo.refresh() == {"timestamp": v + 1}
    assert long.repo.root_expires() > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=300)


def test_threshold_two_for_root_and_targets(tmp_path: Path, key) -> None:
    h = make_repository(tmp_path, trust=trust_for(key), threshold={"root": 2, "targets": 2})
    first_root = h.root_path.read_bytes()
    root_keys = h.repo.root().signed.roles["root"].keyids
    assert len(root_keys) == 2  # keys default to the threshold
    published = h.publish(make_bundle(tmp_path, key))
    assert (
        len(json.loads((h.metadata_dir / f"{published.targets_version}.targets.json").read_bytes())["signatures"]) == 2
    )
    lost = h.repo.root().signed.roles["targets"].keyids[0]
    (h.keys_dir / "targets" / f"{lost}.pem").unlink()
    with pytest.raises(R.RepositoryError, match=f"role targets needs 2 of its keys to sign; 1 found.*missing: {lost}"):
        h.publish(make_bundle(tmp_path, key, version="2.0.0"))
    # replace the lost targets key: root (2 of 2 present) signs the new root; targets re-signed by 2 keys
    new = h.repo.rotate_key("targets", lost)
    assert set(h.repo.root().signed.roles["targets"].keyids) == {
        new,
        *(k for k in json.loads(first_root)["signed"]["roles"]["targets"]["keyids"] if k != lost),
    }
    h.publish(make_bundle(tmp_path, key, version="2.0.0"))
    # root with one of its two keys gone: no rotation at all
    (h.keys_dir / "root" / f"{root_keys[1]}.pem").unlink()
    with pytest.raises(R.RepositoryError, match="role root needs 2 of its keys to sign; 1 found"):
        h.repo.rotate_key("root", root_keys[1])
    up = client(tmp_path, h.repo_dir, first_root)
    up.refresh()
    assert up.get_targetinfo(layout.target_path("tiny", "2.0.0")) is not None
