"""A signed manifest with text that cannot be encoded as UTF-8 (issue 16, item 4; a regression of the bundle hardening
of issue 11): an unpaired surrogate, written as a JSON escape (``"\\ud800"``) or as the UTF-8-style bytes of one
(ED A0 80, which Python's json decodes with ``surrogatepass``), in a value, a nested field or a key.

Its canonical bytes cannot be made (``.encode("utf-8")`` raises UnicodeEncodeError), so before the fix every entry
point that reached them ended in a traceback. Now each refuses it as ``bad_manifest`` (an unreadable signature
file, as before, as ``bad_signature_file``), and nothing is installed. RFC 8259 section 8.2: such strings have
unpredictable behaviour; a manifest is signed text, so it must be exactly encodable.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from engines import bundle as B
from engines.errors import BundleError
from engines.keys import key_id, public_key_b64, sign
from engines.manifest import Manifest, loads_strict
from engines.registry import Registry
from testsupport.bundles import make_bundle, manifest_doc, new_key, trust_for
from testsupport.common import PYTHON, ROOT

LONE = "\ud800"


@pytest.fixture(scope="module")
def key() -> Any:
    return new_key()


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


def _signature(priv: Any, manifest: bytes, kid: str | None = None) -> bytes:
    sig = {"alg": "Ed25519", "key_id": kid or key_id(priv), "sig": base64.b64encode(sign(priv, manifest)).decode()}
    return json.dumps(sig).encode()


def _evil(tmp: Path, priv: Any, edit, *, raw_bytes: bool = False) -> Path:
    """The good tiny bundle with its manifest edited by ``edit(doc)`` and validly signed again. The manifest bytes
    hold the surrogate as a JSON escape, or (``raw_bytes``) as its UTF-8-style bytes ED A0 80."""
    members = _members(make_bundle(tmp, priv))
    doc = json.loads(members.pop("manifest.json"))
    members.pop("signature")
    edit(doc)
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    if raw_bytes:
        raw = raw.replace(b"\\ud800", b"\xed\xa0\x80")
    assert (b"\\ud800" in raw) != raw_bytes and (b"\xed\xa0\x80" in raw) == raw_bytes
    out = tmp / "evil.bundle"
    return _tar(out, [("manifest.json", raw), ("signature", _signature(priv, raw)), *members.items()])


EDITS = {
    "title": lambda d: d.update(title=LONE),
    "nested_value": lambda d: d["applies_to"]["body_parts"].append("CHEST" + LONE),
    "nested_key": lambda d: d["outputs"][0]["thresholds"].update({LONE: 0.5}),
    "top_level_key": lambda d: d.update({LONE: 1}),
    "bundle_id": lambda d: d.update(bundle_id="tiny" + LONE),
}


def _refused(call, reason: str = "bad_manifest") -> BundleError:
    with pytest.raises(BundleError) as ei:
        call()
    assert ei.value.reason == reason, ei.value
    str(ei.value).encode("utf-8")  # the message itself can be printed
    return ei.value


@pytest.mark.parametrize("raw_bytes", [False, True], ids=["json_escape", "utf8_bytes"])
@pytest.mark.parametrize("where", sorted(EDITS))
def test_signed_manifest_with_an_unpaired_surrogate_is_a_bad_manifest_everywhere(
    tmp_path: Path, key: Any, where: str, raw_bytes: bool
) -> None:
    evil = _evil(tmp_path, key, EDITS[where], raw_bytes=raw_bytes)
    err = _refused(lambda: B.verify_bundle(evil, trust_for(key)))
    assert "UTF-8" in str(err)
    _refused(lambda: Registry(tmp_path / "m", trust_for(key)).install(evil))
    assert [p for p in (tmp_path / "m").rglob("*") if not p.is_dir()] == []  # nothing installed, nothing left
    _refused(lambda: B.read_manifest_unverified(evil))
    # an installed bundle directory whose manifest was replaced by the signed evil one (verify_dir)
    good_dir = tmp_path / "unpacked"
    B.unpack_bundle(make_bundle(tmp_path, key), good_dir, trust_for(key))
    members = _members(evil)
    (good_dir / "manifest.json").write_bytes(members["manifest.json"])
    (good_dir / "signature").write_bytes(members["signature"])
    _refused(lambda: B.verify_dir(good_dir, trust_for(key)))
    shutil.rmtree(good_dir)


def test_unencodable_text_in_the_signature_file_is_a_bad_signature_file(tmp_path: Path, key: Any) -> None:
    members = _members(make_bundle(tmp_path, key))
    manifest = members.pop("manifest.json")
    members.pop("signature")
    for sig in (_signature(key, manifest, kid=LONE), _signature(key, manifest).replace(b'"Ed25519"', b'"Ed\\udc00"')):
        evil = _tar(tmp_path / "evil.bundle", [("manifest.json", manifest), ("signature", sig), *members.items()])
        err = _refused(lambda: B.verify_bundle(evil, trust_for(key)), "bad_signature_file")  # noqa: B023
        assert "UTF-8" in str(err)
        _refused(lambda: Registry(tmp_path / "m", trust_for(key)).install(evil), "bad_signature_file")  # noqa: B023


def test_builder_signer_and_canonical_bytes_never_meet_unencodable_text(tmp_path: Path, key: Any) -> None:
    """The central team's side: a manifest object cannot hold such text (so ``canonical_bytes`` never raises
    UnicodeEncodeError), ``build_bundle`` refuses it as bad_manifest, and ``sign_bundle`` refuses an unsigned
    bundle carrying one."""
    for edit in EDITS.values():
        doc = manifest_doc()
        edit(doc)
        with pytest.raises(ValidationError, match="UTF-8"):
            Manifest.model_validate(doc | {"created": "2025-01-01T00:00:00Z", "expires": "2026-01-01T00:00:00Z"})
    good = make_bundle(tmp_path, None, name="unsigned.bundle")
    members = _members(good)
    _refused(lambda: B.build_bundle(tmp_path / "b.bundle", manifest_doc(title=LONE), {}))
    raw = members.pop("manifest.json").replace(b'"title":"', b'"title":"\\ud800')
    unsigned = _tar(tmp_path / "unsigned-evil.bundle", [("manifest.json", raw), *members.items()])
    _refused(lambda: B.sign_bundle(unsigned, key))
    with pytest.raises(ValueError, match="UTF-8"):
        loads_strict(b'{"a":[{"b":{"c":"\\udfff"}}]}')
    assert loads_strict('{"t":"\u00e9\U0001f600"}'.encode()) == {"t": "\u00e9\U0001f600"}  # real non-ASCII text


@pytest.mark.integration
def test_cli_model_install_verify_and_build_refuse_without_a_traceback(tmp_path: Path, key: Any) -> None:
    evil = _evil(tmp_path, key, EDITS["nested_key"])
    home = tmp_path / "home"
    home.mkdir()
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(
        '[engines]\nbackend = "ort"\ntrust_demo_key = false\ninstall_reference_bundles = false\n'
        f'[engines.trusted_keys]\n"{key_id(key)}" = "{public_key_b64(key)}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")} | {"PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [PYTHON, "-m", "appliance", "--home", str(home), "--config", str(cfg), *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)

    for args in (("model", "install", str(evil)), ("model", "verify", str(evil))):
        r = cli(*args)
        assert r.returncode == 1 and "reason: bad_manifest" in r.stderr, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr + r.stdout
    r = cli("model", "verify", "--json", str(evil))
    assert r.returncode == 1 and json.loads(r.stdout)["reason"] == "bad_manifest", r.stdout + r.stderr
    rows = cli("model", "list", "--json")
    assert rows.returncode == 0 and json.loads(rows.stdout) == []
    # the builder, given a manifest file with one
    (tmp_path / "m.json").write_text(json.dumps(manifest_doc(title=LONE)))  # ensure_ascii: written as \ud800
    from testsupport.bundles import tiny_onnx

    tiny_onnx(tmp_path / "model.onnx")
    import numpy as np

    np.savez(tmp_path / "inputs.npz", image=np.zeros((1, 1, 16, 16), dtype=np.float32))
    r = cli(
        "model", "build", "--manifest", str(tmp_path / "m.json"), "--model", str(tmp_path / "model.onnx"),
        "--golden-inputs", str(tmp_path / "inputs.npz"), "-o", str(tmp_path / "x.bundle"),
    )  # fmt: skip
    assert r.returncode != 0 and "bad_manifest" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x.bundle").exists()
