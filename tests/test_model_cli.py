"""The model/keys/engine CLI end to end, as the central team and a technician would use it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from testsupport.bundles import SIZE, manifest_doc, tiny_onnx
from testsupport.common import PYTHON, ROOT

pytestmark = pytest.mark.integration


def _run(home: Path, cfg: Path | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [PYTHON, "-m", "appliance", "--home", str(home)]
    if cfg:
        cmd += ["--config", str(cfg)]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_cli_build_sign_verify_install_activate_rollback(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    # central team: a key pair
    r = _run(home, None, "keys", "generate", "--out-dir", str(tmp_path / "keys"), "--name", "team")
    assert r.returncode == 0, r.stderr
    kid, b64 = (tmp_path / "keys" / "team.pub").read_text().split()
    assert oct((tmp_path / "keys" / "team.pem").stat().st_mode & 0o777) == "0o600"
    assert _run(home, None, "keys", "generate", "--out-dir", str(tmp_path / "keys"), "--name", "team").returncode == 1
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(
        f'[engines]\nbackend = "ort"\ntrust_demo_key = false\ninstall_reference_bundles = false\n'
        f'[engines.trusted_keys]\n"{kid}" = "{b64}"\n'
    )
    # build + sign two versions
    tiny_onnx(tmp_path / "model.onnx")
    np.savez(tmp_path / "inputs.npz", image=np.random.default_rng(1).random((2, 1, SIZE, SIZE), dtype=np.float32))
    bundles = {}
    for v in ("1.0.0", "1.1.0"):
        (tmp_path / f"m{v}.json").write_text(json.dumps(manifest_doc("tiny", v)))
        out = tmp_path / f"tiny-{v}.bundle"
        r = _run(
            home,
            cfg,
            "model",
            "build",
            "--manifest",
            str(tmp_path / f"m{v}.json"),
            "--model",
            str(tmp_path / "model.onnx"),
            "--golden-inputs",
            str(tmp_path / "inputs.npz"),
            "-o",
            str(out),
        )
        assert r.returncode == 0, r.stderr
        r = _run(home, cfg, "model", "verify", str(out))
        assert r.returncode == 1 and "reason: unsigned" in r.stderr
        r = _run(home, cfg, "model", "sign", str(out), "--key", str(tmp_path / "keys" / "team.pem"))
        assert r.returncode == 0 and kid in r.stdout, r.stderr
        bundles[v] = out
    r = _run(home, cfg, "model", "verify", "--json", str(bundles["1.0.0"]))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["key_id"] == kid
    # a box that does not trust the key refuses it
    r = _run(home, None, "model", "verify", str(bundles["1.0.0"]))
    assert r.returncode == 1 and "reason: unknown_key" in r.stderr
    # install: verify + compile + golden + activate
    r = _run(home, cfg, "model", "install", str(bundles["1.1.0"]))
    assert r.returncode == 0, r.stderr
    r = _run(home, cfg, "model", "install", str(bundles["1.0.0"]))
    assert r.returncode == 1 and "reason: downgrade" in r.stderr
    r = _run(home, cfg, "model", "install", "--force", "--no-activate", str(bundles["1.0.0"]))
    assert r.returncode == 0, r.stderr
    r = _run(home, cfg, "model", "activate", "tiny", "1.0.0")
    assert r.returncode == 1 and "reason: downgrade" in r.stderr
    r = _run(home, cfg, "model", "activate", "tiny", "1.0.0", "--force")
    assert r.returncode == 0, r.stderr
    rows = json.loads(_run(home, cfg, "model", "list", "--json").stdout)
    assert {(x["version"], x["active"], x["previous"]) for x in rows} == {
        ("1.0.0", True, False),
        ("1.1.0", False, True),
    }
    r = _run(home, cfg, "model", "rollback", "tiny")
    assert r.returncode == 0 and "1.1.0" in r.stdout, r.stderr
    rows = json.loads(_run(home, cfg, "model", "list", "--json").stdout)
    assert next(x for x in rows if x["active"])["version"] == "1.1.0"
    # engines: compile from cache (golden checked) and list them
    r = _run(home, cfg, "engine", "compile")
    assert r.returncode == 0 and "golden OK" in r.stdout, r.stdout + r.stderr
    entries = json.loads(_run(home, cfg, "engine", "list", "--json").stdout)
    assert entries and all(e["key_fields"]["backend"] == "ort" and e["golden"]["passed"] for e in entries)


def test_reference_bundles_install_and_load(tmp_path: Path, monkeypatch) -> None:
    """The shipped reference bundles install only on an explicit opt-in (demo key AND install), then verify with
    the demo key, pass their golden check on ORT and run."""
    for k in list(os.environ):
        if k.startswith("APPLIANCE_"):
            monkeypatch.delenv(k)
    from appliance.core.config import load_settings
    from appliance.models.active import close_engines, ensure_reference_bundles, load_active_engines, reference_bundles

    assert {p.name.split("-")[0] for p in reference_bundles()} == {"cxr", "mmg"}
    fresh = load_settings(None, {"state_dir": tmp_path / "fresh"})
    assert not fresh.engines.trust_demo_key and not fresh.engines.install_reference_bundles
    assert ensure_reference_bundles(fresh) == [] and load_active_engines(fresh) == {}  # a fresh box: no models
    settings = load_settings(None, {"state_dir": tmp_path})
    settings.engines.backend = "ort"
    settings.engines.trust_demo_key = settings.engines.install_reference_bundles = True  # what `appliance demo` sets
    installed = ensure_reference_bundles(settings)
    assert sorted(installed) == ["cxr-phantom@1.0.2", "mmg-phantom@1.0.2"]
    assert ensure_reference_bundles(settings) == []  # only on first run
    engines = load_active_engines(settings)
    assert set(engines) == {"cxr-phantom", "mmg-phantom"}
    for manifest, engine in engines.values():
        assert not manifest.clinical_use and "NOT FOR CLINICAL USE" in manifest.title
        x = np.zeros((2, *manifest.input.shape[1:]), np.float32)
        out = engine.infer({manifest.input.name: x})
        heat = manifest.output("heatmap")
        assert out[heat.name].shape == (2, len(heat.labels), 256 // heat.stride, 256 // heat.stride)
    close_engines(engines)
    # without the demo key the reference bundles are refused (nothing installed, not fatal)
    s2 = load_settings(None, {"state_dir": tmp_path / "other"})
    s2.engines.install_reference_bundles = True
    assert ensure_reference_bundles(s2) == []
    assert load_active_engines(s2) == {}
