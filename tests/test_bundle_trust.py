"""Model trust, each finding of the security review as the attacker's input (issue 11).

- a public key signs clinical models (the demo key, whose private half is in the public repository);
- revocation fails open on an upper-case or padded key id;
- SemVer pre-releases compared as text (rc.9 > rc.10);
- NaN / Infinity in signed manifests, unbounded golden tolerances;
- ``trust=None`` skipping signature checks in engine APIs;
- a tar bomb written before authentication;
- a signed model reading the box's secrets through ONNX external data;
- manifests that never expire.

Every malicious bundle is built here, signed with the key the attacker would have (the public demo key, or a key
the box trusts whose holder went rogue).
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import io
import json
import os
import resource
import signal
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.core.config import ConfigError, Settings, check_problems, load_settings
from appliance.models.active import engine_options, trust_store
from engines import bundle as B
from engines import runtime
from engines.errors import BundleError, TrustError
from engines.golden import compare, reference_outputs, save_golden
from engines.keys import TrustStore, key_id, normalise_key_id, public_key_b64, sign
from engines.manifest import MAX_GOLDEN_ATOL, Manifest, canonical_bytes, compare_versions, parse_utc, version_key
from engines.reference import demo_key
from engines.registry import Registry
from testsupport.bundles import SIZE, demo_private_key, make_bundle, manifest_doc, new_key, trust_for
from testsupport.common import PYTHON, ROOT

ORT = runtime.EngineOptions(backend="ort")


@pytest.fixture(scope="module")
def key():
    return new_key()


@pytest.fixture
def prod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A production box: the configuration defaults, nothing from the environment."""
    for k in list(os.environ):
        if k.startswith("APPLIANCE_"):
            monkeypatch.delenv(k)
    settings = load_settings(None, {"state_dir": tmp_path / "box"})
    settings.engines.backend = "ort"
    return settings


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:*") as tar:
        return {i.name: tar.extractfile(i).read() for i in tar.getmembers() if i.isfile()}  # type: ignore[union-attr]


def _tar(out: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def _signed_raw(out: Path, priv, manifest: dict, files: dict[str, bytes]) -> Path:
    """A bundle whose manifest bytes are exactly what the attacker chose (NaN included), validly signed."""
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    sig = {"alg": "Ed25519", "key_id": key_id(priv), "sig": base64.b64encode(sign(priv, raw)).decode()}
    return _tar(out, [("manifest.json", raw), ("signature", json.dumps(sig).encode()), *files.items()])


def _resigned(good: Path, out: Path, priv, edit) -> Path:
    """``good`` with its manifest edited by ``edit(doc)`` (as parsed JSON) and signed again by ``priv``."""
    members = _members(good)
    doc = json.loads(members.pop("manifest.json"))
    members.pop("signature")
    edit(doc)
    return _signed_raw(out, priv, doc, members)


# --------------------------------------------------------------------------------------------------
# A public key signs clinical models


def test_bundle_signed_with_the_demo_key_is_refused_on_a_production_box(tmp_path: Path, prod: Settings) -> None:
    """The attacker copied the demo private key from the repository and signed a 'clinical' 9.9.9 whose
    thresholds never fire. A box on the defaults refuses it; listing the demo key by hand does not help."""
    assert not prod.engines.trust_demo_key and not prod.engines.install_reference_bundles
    evil = make_bundle(
        tmp_path,
        demo_private_key(),
        bundle_id="cxr-phantom",
        version="9.9.9",
        clinical_use=True,
        title="Chest X-ray findings",
        outputs=[
            {"name": "scores", "kind": "scores", "labels": ["a", "b"], "thresholds": {"a": 1.0, "b": 1.0}},
            {"name": "heatmap", "kind": "heatmap", "labels": ["a", "b"], "activation": "none", "stride": 4},
        ],
    )
    with pytest.raises(BundleError) as ei:
        runtime.install_bundle(prod.models_dir, evil, trust_store(prod), engine_options(prod))
    assert ei.value.reason == "unknown_key"
    assert Registry(prod.models_dir, trust_store(prod)).list() == []

    kid, b64 = demo_key()
    prod.engines.trusted_keys = {f" {kid.upper()} ": b64}  # pasted from the repository, in another spelling
    with pytest.raises(BundleError) as ei:
        runtime.install_bundle(prod.models_dir, evil, trust_store(prod), engine_options(prod))
    assert ei.value.reason == "unknown_key"
    assert any(kid in p and "private half is public" in p for p in check_problems(prod))

    # the same bundle is what it claims to be: with the demo opt-in (appliance demo, tests) it does verify
    prod.engines.trust_demo_key = True
    assert B.verify_bundle(evil, trust_store(prod)).manifest.version == "9.9.9"


def test_demo_private_key_is_not_shipped() -> None:
    patterns = tomllib_load(ROOT / "pyproject.toml")["tool"]["setuptools"]["package-data"]["engines"]
    shipped = {p for pattern in patterns for p in (ROOT / "engines").glob(pattern)}
    assert ROOT / "engines" / "reference" / "keys" / "DEMO-ONLY.pub" in shipped
    assert not [p for p in shipped if "PRIVATE KEY" in p.read_bytes().decode("latin-1")]
    assert not list((ROOT / "engines").rglob("*.pem"))  # nothing in a shipped package holds it


def tomllib_load(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(path.read_text(encoding="utf-8"))


def test_config_check_flags_the_demo_key_and_reference_bundles(prod: Settings) -> None:
    assert check_problems(prod) == []
    kid, b64 = demo_key()
    prod.engines.trust_demo_key = True
    prod.engines.install_reference_bundles = True
    problems = check_problems(prod)
    assert any(p.startswith("engines.trust_demo_key:") for p in problems), problems
    assert any(p.startswith("engines.install_reference_bundles:") for p in problems), problems
    prod.engines.trust_demo_key = prod.engines.install_reference_bundles = False
    prod.engines.trusted_keys = {kid: b64}
    assert [p for p in check_problems(prod) if p.startswith("engines.trusted_keys:") and kid in p]


@pytest.mark.integration
def test_appliance_config_check_exits_1_on_trust_demo_key(tmp_path: Path) -> None:
    def check(toml: str) -> subprocess.CompletedProcess:
        cfg = tmp_path / "a.toml"
        cfg.write_text(toml)
        return subprocess.run(
            [PYTHON, "-m", "appliance", "--home", str(tmp_path / "h"), "-c", str(cfg), "config", "check"],
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "300"},
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = check("[engines]\n")
    assert ok.returncode == 0 and "config OK" in ok.stderr, ok.stderr
    bad = check("[engines]\ntrust_demo_key = true\n")
    assert bad.returncode == 1 and "problem: engines.trust_demo_key:" in bad.stderr, bad.stderr


# --------------------------------------------------------------------------------------------------
# Revocation fails open on an upper-case or padded key id


@pytest.mark.parametrize("spelling", [str.upper, lambda k: f"  {k}  ", lambda k: f"\t{k.upper()}\n"])
def test_revocation_holds_whatever_the_spelling(tmp_path: Path, key, spelling) -> None:
    good = make_bundle(tmp_path, key)
    kid = key_id(key)
    store = TrustStore.from_config({spelling(kid): public_key_b64(key)}, [spelling(kid)])
    with pytest.raises(BundleError) as ei:
        B.verify_bundle(good, store)
    assert ei.value.reason == "revoked_key"
    # the id in the signature file spelled differently: still the revoked key
    members = _members(good)
    sig = json.loads(members["signature"])
    sig["key_id"] = spelling(kid)
    members["signature"] = json.dumps(sig).encode()
    respelled = _tar(tmp_path / "respelled.bundle", list(members.items()))
    with pytest.raises(BundleError) as ei:
        B.verify_bundle(respelled, trust_for(key, revoked=(kid,)))
    assert ei.value.reason == "revoked_key"
    # and through the box's configuration
    settings = Settings(state_dir=tmp_path / "box")
    settings.engines.trusted_keys = {spelling(kid): public_key_b64(key)}
    settings.engines.revoked_keys = [spelling(kid)]
    with pytest.raises(BundleError) as ei:
        B.verify_bundle(good, trust_store(settings))
    assert ei.value.reason == "revoked_key"


@pytest.mark.parametrize("bad", ["", "xyz", "0123456789abcde", "0123456789abcdef0", "0123456789abcdeg", "01 23"])
def test_malformed_key_ids_are_refused(bad: str, key, tmp_path: Path) -> None:
    with pytest.raises(TrustError) as ei:
        normalise_key_id(bad)
    assert ei.value.reason == "bad_key_id"
    with pytest.raises(TrustError):
        TrustStore.from_config({key_id(key): public_key_b64(key)}, [bad])
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[engines]\nrevoked_keys = ["{bad}"]\n')
    with pytest.raises(ConfigError) as ce:
        load_settings(cfg)
    assert "engines.revoked_keys" in str(ce.value)


def test_config_normalises_key_ids(tmp_path: Path, key) -> None:
    cfg = tmp_path / "a.toml"
    kid = key_id(key)
    trusted = f'trusted_keys = {{ " {kid.upper()}" = "{public_key_b64(key)}" }}'
    cfg.write_text(f'[engines]\n{trusted}\nrevoked_keys = ["{kid.upper()} "]\n')
    s = load_settings(cfg)
    assert list(s.engines.trusted_keys) == [kid] and s.engines.revoked_keys == [kid]


# --------------------------------------------------------------------------------------------------
# SemVer 2.0.0 precedence (section 11)


def test_semver_precedence_section_11() -> None:
    chain = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0-rc.9",
        "1.0.0-rc.10",
        "1.0.0",
        "1.0.1",
        "1.1.0",
        "2.0.0",
        "10.0.0",
    ]
    assert sorted(reversed(chain), key=version_key) == chain
    for lo, hi in zip(chain, chain[1:], strict=False):
        assert compare_versions(lo, hi) == -1 and compare_versions(hi, lo) == 1
    assert compare_versions("1.0.0-rc.1", "1.0.0-rc.1") == 0
    assert version_key("1.0.0-1") < version_key("1.0.0-a")  # numeric identifiers before alphanumeric ones
    for bad in ("1.0", "01.0.0", "1.0.0-rc.01", "1.0.0-rc..1", "1.0.0-", "1.0.0+build", "v1.0.0"):
        with pytest.raises(ValueError):
            version_key(bad)


def test_rc9_after_rc10_is_a_downgrade(tmp_path: Path, key) -> None:
    reg = Registry(tmp_path / "m", trust_for(key))
    reg.install(make_bundle(tmp_path, key, version="1.0.0-rc.10"))
    with pytest.raises(BundleError) as ei:
        reg.install(make_bundle(tmp_path, key, version="1.0.0-rc.9"))
    assert ei.value.reason == "downgrade"
    reg.install(make_bundle(tmp_path, key, version="1.0.0"))  # the release is newer than its pre-releases


# --------------------------------------------------------------------------------------------------
# Identifiers: ``$`` in a Python pattern also matches before a final newline, and ``\d`` matches every
# Unicode decimal digit ("1\u0663" is int 13): neither may pass a validator of names, versions or digests.

_NL_OR_DIGITS = ["1.0.0\n", "1\u0663.0.0", "1.0.0-rc.1\u0663", "\uff11.0.0"]


@pytest.mark.parametrize("version", _NL_OR_DIGITS)
def test_version_with_a_newline_or_non_ascii_digits_is_not_semver(version: str) -> None:
    with pytest.raises(ValueError):
        version_key(version)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.__setitem__("version", "1.0.0\n"),
        lambda d: d.__setitem__("version", "1\u0663.0.0"),
        lambda d: d.__setitem__("bundle_id", "tiny\n"),
        lambda d: d.__setitem__("min_appliance_version", "0.1.0\n"),
    ],
    ids=["version-newline", "version-arabic-digit", "bundle-id-newline", "min-version-newline"],
)
def test_signed_manifest_with_a_newline_or_non_ascii_digits_in_an_identifier_is_refused(
    tmp_path: Path, key, edit
) -> None:
    good = make_bundle(tmp_path, key)
    evil = _resigned(good, tmp_path / "evil.bundle", key, edit)
    with pytest.raises(BundleError) as ei:
        Registry(tmp_path / "m", trust_for(key)).install(evil)
    assert ei.value.reason == "bad_manifest"
    installed = tmp_path / "m" / "bundles"
    assert not installed.exists() or [p.name for p in installed.iterdir() if not p.name.startswith(".")] == []


@pytest.mark.parametrize("name", ["model.onnx\n", "assets/w\n", "assets/\u0663"])
def test_member_names_with_a_newline_are_unsafe(name: str) -> None:
    with pytest.raises(BundleError) as ei:
        B._check_name(name, None)
    assert ei.value.reason == "path_traversal"


def test_digest_and_key_id_patterns_refuse_a_trailing_newline(tmp_path: Path, key) -> None:
    good = make_bundle(tmp_path, key)

    def newline_digest(d: dict) -> None:
        d["files"]["golden.npz"] += "\n"

    evil = _resigned(good, tmp_path / "evil.bundle", key, newline_digest)
    with pytest.raises(BundleError) as ei:
        Registry(tmp_path / "m", trust_for(key)).install(evil)
    assert ei.value.reason == "bad_manifest" and "sha256" in str(ei.value)
    from engines.keys import KEY_ID

    assert KEY_ID.match(key_id(key)) and not KEY_ID.match(key_id(key) + "\n")


@pytest.mark.parametrize(
    "extra",
    [{"assets": b"a", "assets/x": b"b"}, {"model.onnx/x": b"b"}, {"assets/w\n": b"c"}, {"assets//w": b"d"}],
    ids=["file-and-directory", "model-as-directory", "newline", "empty-part"],
)
def test_signed_file_list_that_cannot_be_a_tree_is_a_bad_manifest(tmp_path: Path, key, extra: dict) -> None:
    """A signed manifest listing "assets" and "assets/x" (or "model.onnx/x") names a file that must also be a
    directory: unpacking raised FileExistsError, not BundleError, past every caller that handles bundle
    errors. Member names in the manifest now follow the same rules as tar members, and no name is a
    directory of another: refused as bad_manifest before anything is written; the builder refuses it too."""
    import hashlib

    good = make_bundle(tmp_path, key)

    def add(d: dict) -> None:
        for name, data in extra.items():
            d["files"][name] = hashlib.sha256(data).hexdigest()
            d["file_sizes"][name] = len(data)

    members = _members(good)
    doc = json.loads(members.pop("manifest.json"))
    members.pop("signature")
    add(doc)
    evil = _signed_raw(tmp_path / "evil.bundle", key, doc, {**members, **extra})
    with pytest.raises(BundleError) as ei:
        Registry(tmp_path / "m", trust_for(key)).install(evil)
    assert ei.value.reason == "bad_manifest", ei.value
    with pytest.raises(BundleError) as ei:
        B.verify_bundle(evil, trust_for(key))
    assert ei.value.reason == "bad_manifest"
    src = tmp_path / "src"
    src.mkdir()
    files = {"model.onnx": tmp_path / "m.onnx", "golden.npz": tmp_path / "g.npz"}
    files["model.onnx"].write_bytes(members["model.onnx"])
    files["golden.npz"].write_bytes(members["golden.npz"])
    for i, (name, data) in enumerate(extra.items()):
        (src / str(i)).write_bytes(data)
        files[name] = src / str(i)
    manifest = {
        k: v for k, v in json.loads(_members(good)["manifest.json"]).items() if k not in ("files", "file_sizes")
    }
    with pytest.raises(BundleError) as ei:
        B.build_bundle(tmp_path / "built.bundle", manifest, files)
    assert ei.value.reason in ("bad_manifest", "path_traversal")


@pytest.mark.parametrize("which", ["manifest.json", "signature"])
def test_deeply_nested_json_before_authentication_is_a_bundle_error(tmp_path: Path, key, which: str) -> None:
    """A manifest of 200 000 "[" (within its 1 MiB bound) or a signature file of 16 000 "[" (within 16 KiB) is
    parsed before anything is authenticated: json raised RecursionError, which escaped every caller that
    handles BundleError (``model verify``, install, the update agent). Now a clear BundleError."""
    members = _members(make_bundle(tmp_path, key))
    members[which] = b"[" * (200_000 if which == "manifest.json" else 16_000)
    evil = _tar(tmp_path / "deep.bundle", [(n, members[n]) for n in ("manifest.json", "signature", "model.onnx")])
    # the signature is checked over the manifest bytes before they are parsed: that one fails first
    want = {"manifest.json": "bad_signature", "signature": "bad_signature_file"}[which]
    with pytest.raises(BundleError) as ei:
        B.verify_bundle(evil, trust_for(key))
    assert ei.value.reason == want
    with pytest.raises(BundleError) as ei:
        Registry(tmp_path / "m", trust_for(key)).install(evil)
    assert ei.value.reason == want
    if which == "manifest.json":
        with pytest.raises(BundleError) as ei:
            B.read_manifest_unverified(evil)
        assert ei.value.reason == "bad_manifest" and "nested" in str(ei.value)
    else:
        assert "nested" in str(ei.value)


# --------------------------------------------------------------------------------------------------
# Non-finite numbers and unbounded tolerances in signed manifests


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["outputs"][0]["thresholds"].__setitem__("a", float("nan")),
        lambda d: d["outputs"][0]["thresholds"].__setitem__("a", float("inf")),
        lambda d: d["golden_tolerances"]["scores"]["fp32"].__setitem__("rtol", float("inf")),
        lambda d: d["inputs"][0]["preprocessing"].__setitem__("std", float("nan")),
    ],
    ids=["nan-threshold", "infinite-threshold", "infinite-rtol", "nan-std"],
)
def test_non_finite_numbers_in_a_signed_manifest_are_refused(tmp_path: Path, key, edit) -> None:
    good = make_bundle(tmp_path, key)
    evil = _resigned(good, tmp_path / "evil.bundle", key, edit)
    assert b"NaN" in _members(evil)["manifest.json"] or b"Infinity" in _members(evil)["manifest.json"]
    with pytest.raises(BundleError) as ei:
        Registry(tmp_path / "m", trust_for(key)).install(evil)
    assert ei.value.reason == "bad_manifest" and "non-finite" in str(ei.value)
    assert not (tmp_path / "m" / "bundles" / "tiny").exists()


def test_overflowing_number_is_refused(tmp_path: Path, key) -> None:
    good = make_bundle(tmp_path, key)
    members = _members(good)
    raw = members.pop("manifest.json").replace(b'"thresholds":{"a":0.5}', b'"thresholds":{"a":1e999}')
    assert b"1e999" in raw
    sig = {"alg": "Ed25519", "key_id": key_id(key), "sig": base64.b64encode(sign(key, raw)).decode()}
    members["signature"] = json.dumps(sig).encode()
    evil = _tar(tmp_path / "evil.bundle", [("manifest.json", raw), *members.items()])
    with pytest.raises(BundleError) as ei:
        B.verify_bundle(evil, trust_for(key))
    assert ei.value.reason == "bad_manifest"


@pytest.mark.parametrize("tol", [{"atol": 1e9, "rtol": 0.0}, {"atol": 0.0, "rtol": 1e9}, {"atol": 0.2, "rtol": 0.2}])
def test_unbounded_golden_tolerances_are_refused(tmp_path: Path, key, tol: dict) -> None:
    tols = {"fp32": tol, "fp16": tol}
    with pytest.raises(BundleError) as ei:  # the central team's builder refuses it...
        make_bundle(tmp_path, key, golden_tolerances={"scores": tols, "heatmap": tols})
    assert ei.value.reason == "bad_manifest"
    good = make_bundle(tmp_path, key)  # ...and so does the box, when a signer slips it past the builder
    evil = _resigned(good, tmp_path / "evil.bundle", key, lambda d: d["golden_tolerances"]["scores"].update(fp32=tol))
    with pytest.raises(BundleError) as ei:
        B.verify_bundle(evil, trust_for(key))
    assert ei.value.reason == "bad_manifest" and "golden_tolerances" in str(ei.value)


def test_golden_compare_never_passes_on_non_finite_or_unbounded_inputs() -> None:
    got = np.zeros(4, np.float32)
    assert not compare("s", got, np.full(4, np.nan, np.float32), 1e-5, 1e-4).passed  # NaN golden values
    assert not compare("s", got, np.ones(4, np.float32), float("nan"), 1e-4).passed
    assert not compare("s", got, np.ones(4, np.float32), MAX_GOLDEN_ATOL * 10, 1e-4).passed
    assert compare("s", got, got, 1e-5, 1e-4).passed


# --------------------------------------------------------------------------------------------------
# trust=None


def test_trust_is_required_everywhere(tmp_path: Path, key) -> None:
    good = make_bundle(tmp_path, key)
    models = tmp_path / "m"
    runtime.install_bundle(models, good, trust_for(key), ORT, activate=False)
    vdir = Registry(models, trust_for(key)).version_dir("tiny", "1.0.0")
    with pytest.raises(TypeError):
        Registry(models, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Registry(models)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        B.verify_bundle(good, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        B.unpack_bundle(good, tmp_path / "u", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        B.verify_dir(vdir, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        runtime.compile_engine(models, "tiny", ORT, version="1.0.0")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        runtime.compile_engine(models, "tiny", ORT, version="1.0.0", trust=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        runtime.load_engine(models, "tiny", ORT, version="1.0.0")  # type: ignore[call-arg]
    assert not (tmp_path / "u").exists()


# --------------------------------------------------------------------------------------------------
# Tar bomb before authentication


def _sparse_bomb(out: Path, name: str, size: int) -> Path:
    """A GNU sparse member of ``size`` bytes that holds no data (all hole): a few hundred bytes gzip'd."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 0
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[483:495] = b"%011o\0" % size  # realsize: what extraction writes (the sparse map is empty: one hole)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    with gzip.GzipFile(out, "wb", mtime=0) as gz:
        gz.write(bytes(header) + b"\0" * 1024)
    return out


def _no_big_files() -> None:
    """In the child: any write past 1 MiB fails with EFBIG instead of succeeding (and SIGXFSZ is ignored)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024**2, 1024**2))


@pytest.mark.integration
@pytest.mark.parametrize("member", ["model.onnx", "manifest.json"])
def test_unsigned_tar_bomb_is_refused_before_writing(tmp_path: Path, member: str) -> None:
    """A ~150-byte unsigned gzip that extracts to 2 GiB: ``appliance model verify`` fails at once, and under a
    1 MiB file-size limit it fails for the right reason (never 'File too large'), writing nothing."""
    bomb = _sparse_bomb(tmp_path / "bomb.bundle", member, 2 * 1024**3 - 1)
    assert bomb.stat().st_size < 200
    with tarfile.open(bomb) as tar:  # what the old reader saw: one regular 2 GiB member
        (info,) = tar.getmembers()
        assert info.isfile() and info.size == 2 * 1024**3 - 1
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r = subprocess.run(
        [PYTHON, "-m", "appliance", "--home", str(tmp_path / "h"), "model", "verify", str(bomb)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TMPDIR": str(scratch), "COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_no_big_files,
    )
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "too large" not in out.lower() and "not_a_bundle" not in out, out
    assert ("[missing_file]" in out) or ("[bad_member_type]" in out), out
    assert sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file()) == 0


def test_tar_bomb_in_process_writes_nothing(tmp_path: Path, key, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    bomb = _sparse_bomb(tmp_path / "bomb.bundle", "model.onnx", 2 * 1024**3 - 1)
    with pytest.raises(BundleError) as ei:
        B.verify_bundle(bomb, trust_for(key))
    assert ei.value.reason == "missing_file" and "first member" in str(ei.value)
    # a validly signed head followed by a bomb member: refused on its type, before a byte of it is written
    good = _members(make_bundle(tmp_path, key))
    head = _tar(tmp_path / "head.tar.gz", [("manifest.json", good["manifest.json"]), ("signature", good["signature"])])
    raw = gzip.decompress(head.read_bytes()).rstrip(b"\0")  # drop the end-of-archive blocks...
    raw += b"\0" * (-len(raw) % 512)  # ...keeping the signature's data block whole (it ends in '}')
    raw += gzip.decompress(_sparse_bomb(tmp_path / "b2", "model.onnx", 2 * 1024**3 - 1).read_bytes())
    mixed = tmp_path / "mixed.bundle"
    mixed.write_bytes(gzip.compress(raw))
    with pytest.raises(BundleError) as ei:
        Registry(tmp_path / "m", trust_for(key)).install(mixed)
    assert ei.value.reason == "bad_member_type"
    assert sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file()) == 0


def test_members_must_come_after_the_signed_manifest_and_have_their_signed_size(tmp_path: Path, key) -> None:
    good = make_bundle(tmp_path, key)
    members = _members(good)
    order = ["golden.npz", "manifest.json", "signature", "model.onnx"]
    reordered = _tar(tmp_path / "r.bundle", [(n, members[n]) for n in order])
    with pytest.raises(BundleError) as ei:
        B.verify_bundle(reordered, trust_for(key))
    assert ei.value.reason == "missing_file" and "first member" in str(ei.value)
    longer = dict(members, **{"golden.npz": members["golden.npz"] + b"\0" * 4096})
    with pytest.raises(BundleError) as ei:
        B.verify_bundle(_tar(tmp_path / "l.bundle", list(longer.items())), trust_for(key))
    assert ei.value.reason == "hash_mismatch" and "the manifest says" in str(ei.value)


# --------------------------------------------------------------------------------------------------
# External data: a signed model reading the box's secrets


def _external_model(work: Path, location: str | None) -> Path:
    """The tiny model with its weight tensor stored as external data at ``location`` (in-bundle when it is
    'assets/weights.bin'); ``None``: rewrite nothing."""
    work.mkdir(parents=True, exist_ok=True)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])
    heat = helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", 2, SIZE // 4, SIZE // 4])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2])
    w = numpy_helper.from_array(np.array([1.0, -1.0], np.float32).reshape(2, 1, 1, 1), "w")
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Conv", ["pooled", "w"], ["heatmap"]),
        helper.make_node("ReduceMean", ["heatmap"], ["mean"], axes=[2, 3], keepdims=0),
        helper.make_node("Sigmoid", ["mean"], ["scores"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "tiny-ext", [x], [heat, scores], initializer=[w]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    (work / "assets").mkdir(exist_ok=True)
    onnx.save_model(
        model, str(work / "model.onnx"), save_as_external_data=True, location="assets/weights.bin", size_threshold=0
    )
    if location is not None and location != "assets/weights.bin":
        m = onnx.load(str(work / "model.onnx"), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        onnx.save_model(m, str(work / "model.onnx"))
    return work / "model.onnx"


def test_in_bundle_external_data_installs_compiles_and_passes_golden(tmp_path: Path, key) -> None:
    work = tmp_path / "src"
    model = _external_model(work, "assets/weights.bin")
    inputs = {"image": np.random.default_rng(0).random((2, 1, SIZE, SIZE), dtype=np.float32)}
    save_golden(work / "golden.npz", inputs, reference_outputs(model, inputs))
    path = tmp_path / "ext.bundle"
    files = {"model.onnx": model, "golden.npz": work / "golden.npz", "assets/weights.bin": work / "assets/weights.bin"}
    B.build_bundle(path, manifest_doc("ext"), files)
    B.sign_bundle(path, key)
    models = tmp_path / "m"
    runtime.install_bundle(models, path, trust_for(key), ORT)
    res = runtime.compile_engine(models, "ext", ORT, trust=trust_for(key))
    try:
        assert res.golden.passed and res.version == "1.0.0"
        out = res.engine.infer(inputs)
        np.testing.assert_allclose(out["scores"], reference_outputs(model, inputs)["scores"], rtol=1e-5)
    finally:
        res.engine.close()
    assert Registry(models, trust_for(key)).active_version("ext") == "1.0.0"


@pytest.mark.parametrize(
    "location",
    [
        "../../secrets/device_secret",
        "/etc/hostname",
        "assets/../../secrets/device_secret",
        "assets\\..\\x",
        "other.bin",
    ],
)
def test_external_data_outside_the_bundle_is_refused(tmp_path: Path, key, location: str) -> None:
    """A rogue signer's model points its weights at the box's device secret: refused at build, and (built by
    hand, validly signed) refused by the box before any runtime parses it."""
    models = tmp_path / "box" / "models"
    secret = tmp_path / "box" / "secrets" / "device_secret"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"\x01" * 8)
    work = tmp_path / "src"
    model = _external_model(work, location)
    inputs = {"image": np.zeros((1, 1, SIZE, SIZE), np.float32)}
    save_golden(work / "golden.npz", inputs, {"scores": np.zeros((1, 2), np.float32)})
    files = {"model.onnx": model, "golden.npz": work / "golden.npz", "assets/weights.bin": work / "assets/weights.bin"}
    with pytest.raises(BundleError) as ei:
        B.build_bundle(tmp_path / "x.bundle", manifest_doc("evil"), files)
    assert ei.value.reason == "external_data"
    # the attacker's own tooling: a correct manifest (hashes, sizes) for these files, signed with a trusted key
    doc = manifest_doc("evil")
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    doc["created"] = now.isoformat().replace("+00:00", "Z")
    doc["expires"] = (now + dt.timedelta(days=30)).isoformat().replace("+00:00", "Z")
    doc["files"] = {n: B.sha256_file(p) for n, p in files.items()}
    doc["file_sizes"] = {n: p.stat().st_size for n, p in files.items()}
    doc = json.loads(canonical_bytes(Manifest.model_validate(doc)))  # what the signer's tooling would sign
    evil = _signed_raw(tmp_path / "evil.bundle", key, doc, {n: p.read_bytes() for n, p in files.items()})
    with pytest.raises(BundleError) as ei:
        runtime.install_bundle(models, evil, trust_for(key), ORT)
    assert ei.value.reason == "external_data" and repr(location) in str(ei.value)
    assert Registry(models, trust_for(key)).list() == []


# --------------------------------------------------------------------------------------------------
# Expiry


def test_expired_manifest_is_refused(tmp_path: Path, key) -> None:
    old = make_bundle(tmp_path, key, created="2020-01-01T00:00:00Z", expires="2021-01-01T00:00:00Z")
    with pytest.raises(BundleError) as ei:
        Registry(tmp_path / "m", trust_for(key)).install(old)
    assert ei.value.reason == "expired" and "2021-01-01T00:00:00Z" in str(ei.value)
    fresh = B.verify_bundle(make_bundle(tmp_path / "f", key), trust_for(key)).manifest
    assert dt.timedelta(days=364) < parse_utc(fresh.expires) - parse_utc(fresh.created) <= dt.timedelta(days=366)


@pytest.mark.parametrize(
    "over",
    [
        {"expires": "2030-01-01T00:00:00"},  # no zone
        {"expires": "not a date"},
        {"created": "2026-01-02T00:00:00Z", "expires": "2026-01-01T00:00:00Z"},  # before created
        {"created": "2026-01-01T00:00:00Z", "expires": "2099-01-01T00:00:00Z"},  # more than 10 years
    ],
)
def test_bad_expiry_is_refused(tmp_path: Path, key, over: dict) -> None:
    with pytest.raises(BundleError) as ei:
        make_bundle(tmp_path, key, **over)
    assert ei.value.reason == "bad_manifest"


def test_a_manifest_without_expiry_is_refused(tmp_path: Path, key) -> None:
    good = make_bundle(tmp_path, key)
    evil = _resigned(good, tmp_path / "e.bundle", key, lambda d: d.pop("expires"))
    with pytest.raises(BundleError) as ei:
        B.verify_bundle(evil, trust_for(key))
    assert ei.value.reason == "bad_manifest" and "expires" in str(ei.value)


def test_reference_bundles_verify_with_the_public_demo_key_and_expire() -> None:
    from engines.reference import reference_bundles

    kid, b64 = demo_key()
    for path in reference_bundles():
        v = B.verify_bundle(path, TrustStore.from_config({kid: b64}))
        assert v.key_id == kid and not v.manifest.clinical_use
        assert parse_utc(v.manifest.expires) > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=365)
