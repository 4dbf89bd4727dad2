"""Daemon behaviour with real parts (storescu -> daemon -> Orthanc) that the reference bundles do not need:
restart between inference and export, routing to ``no_model``, and ``appliance infer`` with an installed bundle.

The bundle is the tiny deterministic detector of ``pipeline_tools`` (heatmap = average pool, score = max),
built, signed and installed through the engines package exactly like a real bundle. Localisation on real
phantoms, every transfer syntax and mammography laterality: ``test_pipeline_reference.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from engines import bundle as B
from engines.golden import reference_outputs, save_golden
from engines.keys import TrustStore, generate_private_key, key_id, public_key_b64
from engines.runtime import install_bundle
from testsupport.common import ROOT, wait_until
from testsupport.daemon import daemon_env, running_daemon
from testsupport.dcmtk import storescu
from testsupport.orthanc import AET, Orthanc
from testsupport.pipeline import SIZE, make_dataset, save, synthetic_image, tiny_manifest, tiny_model_bytes

pytestmark = pytest.mark.integration


def install_tiny_bundle(home: Path, work: Path) -> tuple[str, str]:
    """Build, sign and install the tiny detector as a bundle; returns (key id, public key b64)."""
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model.onnx"
    model.write_bytes(tiny_model_bytes())
    inputs = {"image": np.random.default_rng(0).random((2, 1, SIZE, SIZE), dtype=np.float32)}
    save_golden(work / "golden.npz", inputs, reference_outputs(model, inputs))
    doc = tiny_manifest().model_dump(mode="json")
    for k in ("files", "file_sizes", "created", "expires", "schema_version", "min_appliance_version"):
        doc.pop(k, None)
    path = work / "tiny.bundle"
    B.build_bundle(path, doc, {"model.onnx": model, "golden.npz": work / "golden.npz"})
    key = generate_private_key()
    B.sign_bundle(path, key)
    kid, pub = key_id(key), public_key_b64(key)
    install_bundle(home / "models", path, TrustStore.from_config({kid: pub}))
    return kid, pub


def _config(home: Path, pacs: Orthanc, kid: str, pub: str) -> str:
    return (
        f'[engines]\ntrusted_keys = {{ "{kid}" = "{pub}" }}\n'
        "[pipeline]\nenabled = true\npoll_s = 0.2\nretry_initial_s = 0.5\n"
        f'[[pipeline.destinations]]\nname = "pacs"\nae_title = "{AET}"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
    )


def _results_in_pacs(pacs: Orthanc, study_uid: str) -> list[dict]:
    return [t for t in pacs.instances_of_study(study_uid) if t.get("Modality") in ("SR", "OT")]


def test_killed_between_inference_and_export_delivers_once_after_restart(home: Path, tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "pacs")  # down while the first daemon runs
    kid, pub = install_tiny_bundle(home, tmp_path / "bundle")
    cfg = _config(home, pacs, kid, pub)
    ds = make_dataset(synthetic_image(600, 500, (200, 300), radius=20))
    path = save(ds, tmp_path / "in" / "a.dcm")
    env = {"APPLIANCE_PIPELINE__ENABLED": "true"}
    with running_daemon(home, config_toml=cfg, env=env) as d:
        assert storescu(d.port, [path]).returncode == 0
        wait_until(lambda: d.studies("inferred"), timeout=60, what="inferred")
        d.kill()  # SIGKILL: results durable, export pending
    pacs.start()
    try:
        with running_daemon(home, config_toml=cfg, env=env) as d2:
            wait_until(lambda: d2.studies("exported"), timeout=60, what="exported after restart")
            assert len(_results_in_pacs(pacs, ds.StudyInstanceUID)) == 2
            rows = d2.query("SELECT COUNT(*) AS n FROM exports WHERE state='done'")
            assert rows[0]["n"] == 2
    finally:
        pacs.stop()


def test_study_no_bundle_applies_to_is_no_model(home: Path, tmp_path: Path) -> None:
    """Routing by applies_to: the tiny bundle is for DX/CR, so an MG study is recorded as no_model."""
    kid, pub = install_tiny_bundle(home, tmp_path / "bundle")
    pacs = Orthanc(tmp_path / "pacs")
    study = pydicom.uid.generate_uid()
    files = [
        save(
            make_dataset(synthetic_image(300, 240, None), modality="MG", laterality=s, view=v, study_uid=study),
            tmp_path / "mg" / f"{s}{v}.dcm",
        )
        for s in "LR"
        for v in ("CC", "MLO")
    ]
    with running_daemon(
        home, config_toml=_config(home, pacs, kid, pub), env={"APPLIANCE_PIPELINE__ENABLED": "true"}
    ) as d:
        assert storescu(d.port, files).returncode == 0
        rows = wait_until(lambda: d.studies("no_model"), timeout=30, what="no_model")
        assert "MG" in rows[0]["detail"]


def test_appliance_infer_cli_with_installed_bundle(home: Path, tmp_path: Path) -> None:
    kid, pub = install_tiny_bundle(home, tmp_path / "bundle")
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[engines]\ninstall_reference_bundles = false\ntrusted_keys = {{ "{kid}" = "{pub}" }}\n')
    ds = make_dataset(synthetic_image(500, 400, (150, 250), radius=15))
    src = save(ds, tmp_path / "in" / "x.dcm")
    args = [sys.executable, "-m", "appliance", "--home", str(home), "-c", str(cfg), "infer", str(src.parent)]
    table = subprocess.run(
        [*args, "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120, env=daemon_env()
    )
    assert table.returncode == 0, table.stdout + table.stderr
    assert "nodule" in table.stdout and "POSITIVE" in table.stdout and "sr-" in table.stdout
    js = subprocess.run([*args, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=daemon_env())
    report = json.loads(js.stdout)
    f = report["studies"][0]["results"][0]["findings"][0]
    assert report["studies"][0]["study_uid"] == ds.StudyInstanceUID and f["positive"]
    assert abs(f["location"]["row"] - 150) < 10 and abs(f["location"]["col"] - 250) < 8
