"""Bundle format and trust: every bad input is refused with a specific reason and nothing is installed."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from engines import bundle as B
from engines.errors import BundleError, TrustError
from engines.keys import TrustStore, key_id, public_key_b64
from engines.registry import Registry
from testsupport.bundles import make_bundle, new_key, trust_for


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path, "r:*") as tar:
        return [(i, tar.extractfile(i).read() if i.isfile() else b"") for i in tar.getmembers()]


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes | None] | None = None, extra=()) -> Path:
    """Copy a bundle, replacing (bytes) or dropping (None) members and appending raw extra TarInfos."""
    replace = replace or {}
    with tarfile.open(dst, "w:gz") as tar:
        for info, data in _members(src):
            if info.name in replace:
                if replace[info.name] is None:
                    continue
                data = replace[info.name]
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return dst


def _read(path: Path, name: str) -> bytes:
    return dict((i.name, d) for i, d in _members(path))[name]


@pytest.fixture(scope="module")
def key():
    return new_key()


@pytest.fixture(scope="module")
def good(tmp_path_factory, key) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b"), key)


def _refused(path: Path, trust: TrustStore, reason: str, tmp_path: Path, **kw) -> BundleError:
    reg = Registry(tmp_path / "models", trust)
    with pytest.raises(BundleError) as ei:
        reg.install(path, **kw)
    assert ei.value.reason == reason, str(ei.value)
    assert reg.list() == [] or kw.get("keep"), "nothing may be installed"
    assert not any((tmp_path / "models" / "bundles").glob("tiny/*/model.onnx"))
    return ei.value


def test_good_bundle_verifies_and_installs(good, key, tmp_path) -> None:
    v = B.verify_bundle(good, trust_for(key))
    assert v.manifest.bundle_id == "tiny" and v.key_id == key_id(key)
    assert set(v.manifest.files) == {"model.onnx", "golden.npz"}
    reg = Registry(tmp_path / "m", trust_for(key))
    reg.install(good)
    (inst,) = reg.list()
    assert (inst.bundle_id, inst.version, inst.active) == ("tiny", "1.0.0", False)
    assert reg.verify_installed("tiny", "1.0.0").digest == v.digest
    reg.install(good)  # same bundle again: idempotent
    assert len(reg.list()) == 1


def test_tampered_model(good, key, tmp_path) -> None:
    bad = _rewrite(good, tmp_path / "x.bundle", {"model.onnx": _read(good, "model.onnx") + b"\0"})
    _refused(bad, trust_for(key), "hash_mismatch", tmp_path)


def test_tampered_manifest(good, key, tmp_path) -> None:
    doc = json.loads(_read(good, "manifest.json"))
    doc["outputs"][0]["thresholds"]["a"] = 0.01
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    _refused(_rewrite(good, tmp_path / "x.bundle", {"manifest.json": raw}), trust_for(key), "bad_signature", tmp_path)


def test_tampered_signature(good, key, tmp_path) -> None:
    sig = json.loads(_read(good, "signature"))
    sig["sig"] = sig["sig"][:-4] + ("AAA=" if not sig["sig"].endswith("AAA=") else "BBB=")
    bad = _rewrite(good, tmp_path / "x.bundle", {"signature": json.dumps(sig).encode()})
    _refused(bad, trust_for(key), "bad_signature", tmp_path)
    bad2 = _rewrite(good, tmp_path / "y.bundle", {"signature": b"not json"})
    _refused(bad2, trust_for(key), "bad_signature_file", tmp_path)


def test_unsigned(tmp_path, key) -> None:
    _refused(make_bundle(tmp_path, None), trust_for(key), "unsigned", tmp_path)


def test_unknown_and_revoked_key_and_rotation(good, key, tmp_path) -> None:
    other = new_key()
    _refused(good, trust_for(other), "unknown_key", tmp_path)
    _refused(good, trust_for(key, other, revoked=(key_id(key),)), "revoked_key", tmp_path)
    # rotation: old and new key both trusted; a bundle signed by the new key verifies too
    newer = make_bundle(tmp_path / "n", other, version="1.1.0")
    both = trust_for(key, other)
    assert B.verify_bundle(good, both).key_id == key_id(key)
    assert B.verify_bundle(newer, both).key_id == key_id(other)


def test_trust_store_rejects_mismatched_key_id(key) -> None:
    with pytest.raises(TrustError) as ei:
        TrustStore.from_config({"0000000000000000": public_key_b64(key)})
    assert ei.value.reason == "key_id_mismatch"


def test_missing_file(good, key, tmp_path) -> None:
    _refused(_rewrite(good, tmp_path / "x.bundle", {"golden.npz": None}), trust_for(key), "missing_file", tmp_path)
    _refused(_rewrite(good, tmp_path / "y.bundle", {"manifest.json": None}), trust_for(key), "missing_file", tmp_path)


def test_unlisted_extra_file(good, key, tmp_path) -> None:
    info = tarfile.TarInfo("assets/extra.txt")
    info.size = 3
    _refused(_rewrite(good, tmp_path / "x.bundle", extra=[(info, b"abc")]), trust_for(key), "unlisted_file", tmp_path)


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "assets/../../x", "a//b", "./model.onnx"])
def test_path_traversal(good, key, tmp_path, name) -> None:
    info = tarfile.TarInfo(name)
    info.size = 1
    _refused(_rewrite(good, tmp_path / "x.bundle", extra=[(info, b"x")]), trust_for(key), "path_traversal", tmp_path)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "x").exists()


def test_symlink_and_special_members(good, key, tmp_path) -> None:
    link = tarfile.TarInfo("assets/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _refused(_rewrite(good, tmp_path / "x.bundle", extra=[(link, None)]), trust_for(key), "link_member", tmp_path)
    hard = tarfile.TarInfo("assets/hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "model.onnx"
    _refused(_rewrite(good, tmp_path / "y.bundle", extra=[(hard, None)]), trust_for(key), "link_member", tmp_path)
    d = tarfile.TarInfo("assets")
    d.type = tarfile.DIRTYPE
    _refused(_rewrite(good, tmp_path / "z.bundle", extra=[(d, None)]), trust_for(key), "bad_member_type", tmp_path)


def test_duplicate_member(good, key, tmp_path) -> None:
    info = tarfile.TarInfo("model.onnx")
    info.size = 1
    _refused(_rewrite(good, tmp_path / "x.bundle", extra=[(info, b"x")]), trust_for(key), "duplicate_member", tmp_path)


def test_oversized_member(good, key, tmp_path) -> None:
    limits = B.Limits(max_member_bytes=64)
    _refused(good, trust_for(key), "oversized_member", tmp_path, limits=limits)
    _refused(good, trust_for(key), "oversized_bundle", tmp_path, limits=B.Limits(max_total_bytes=100))


def test_not_a_bundle(key, tmp_path) -> None:
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    _refused(junk, trust_for(key), "not_a_bundle", tmp_path)
    good = make_bundle(tmp_path / "g", key)
    truncated = tmp_path / "trunc.bundle"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _refused(truncated, trust_for(key), "not_a_bundle", tmp_path)


def test_appliance_too_old(key, tmp_path) -> None:
    b = make_bundle(tmp_path, key, min_appliance_version="9.0.0")
    with pytest.raises(BundleError) as ei:
        B.verify_bundle(b, trust_for(key), appliance_version="0.1.0")
    assert ei.value.reason == "appliance_too_old"


def test_downgrade_refused_unless_forced_and_version_conflict(key, tmp_path) -> None:
    trust = trust_for(key)
    reg = Registry(tmp_path / "m", trust)
    reg.install(make_bundle(tmp_path, key, version="1.2.0"))
    reg.activate("tiny", "1.2.0")
    older = make_bundle(tmp_path, key, version="1.1.0")
    with pytest.raises(BundleError) as ei:
        reg.install(older)
    assert ei.value.reason == "downgrade" and "1.1.0" not in {b.version for b in reg.list()}
    reg.install(older, force=True)
    with pytest.raises(BundleError) as ei:
        reg.activate("tiny", "1.1.0")
    assert ei.value.reason == "downgrade" and reg.active_version("tiny") == "1.2.0"
    reg.activate("tiny", "1.1.0", force=True)
    assert reg.active_version("tiny") == "1.1.0"
    # same version, different content
    (tmp_path / "c").mkdir()
    other = make_bundle(tmp_path / "c", key, version="1.2.0", gain=2.0)
    with pytest.raises(BundleError) as ei:
        reg.install(other)
    assert ei.value.reason == "version_conflict"


def test_activate_and_rollback(key, tmp_path) -> None:
    reg = Registry(tmp_path / "m", trust_for(key))
    for v in ("1.0.0", "1.1.0"):
        reg.install(make_bundle(tmp_path, key, version=v))
    reg.activate("tiny", "1.0.0")
    assert reg.activate("tiny", "1.1.0") == "1.0.0"
    st = reg.state("tiny")
    assert (st["active"], st["previous"]) == ("1.1.0", "1.0.0")
    assert reg.rollback("tiny") == "1.0.0"
    assert reg.active_version("tiny") == "1.0.0"
    # state survives a new Registry object (it is on disk), history records the switches
    again = Registry(tmp_path / "m", trust_for(key))
    assert again.active_version("tiny") == "1.0.0"
    assert [h["event"] for h in again.state("tiny")["history"]][-3:] == ["activated", "activated", "rolled_back"]
    with pytest.raises(BundleError) as ei:
        Registry(tmp_path / "m2", trust_for(key)).rollback("tiny")
    assert ei.value.reason == "no_previous"


def test_installed_files_tampered_after_install_detected(good, key, tmp_path) -> None:
    reg = Registry(tmp_path / "m", trust_for(key))
    reg.install(good)
    (reg.version_dir("tiny", "1.0.0") / "model.onnx").write_bytes(b"swapped")
    with pytest.raises(BundleError) as ei:
        reg.verify_installed("tiny", "1.0.0")
    assert ei.value.reason == "hash_mismatch"
