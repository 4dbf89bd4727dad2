"""End-to-end latency: storescu -> appliance daemon -> SR stored in Orthanc, p50/p95 per stage.

Studies: the reference phantoms (``engines.reference.phantoms``) at detector size, J2K lossless: a 1-image
chest (2500x2048, 12-bit, one nodule) and a 4-view mammogram (3328x2560 per view, 14-bit, a mass in the left
breast), each sent with dcmtk ``storescu`` to a running daemon whose PACS destination is a real Orthanc.
The bundles are the REAL reference bundles (``cxr-phantom``, ``mmg-phantom``) on ONNX Runtime (CPU),
installed by the daemon on first run. Each study is a copy of one generated study with fresh UIDs (J2K
encoding a phantom takes seconds; the pixels are not re-encoded).

Stages (seconds, per study):
- receive: storescu start -> storescu exit (association, transfer, durable spool + ACK)
- completion wait: last ACK -> study ``complete`` (the assembler's quiet period, config 0.5 s here)
- preprocess / inference / result building: from the worker's per-study timings (results table)
- export: ``inferred`` -> ``exported`` (C-STORE of SR + SCs to Orthanc, acknowledged)
- total: storescu start -> ``exported``

Run: PYTHONPATH=. python bench/e2e.py [--n 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from engines.reference.phantoms import chest_study, mammo_study  # noqa: E402
from tests.daemon_tools import running_daemon, storescu  # noqa: E402
from tests.orthanc_tools import AET, Orthanc  # noqa: E402


def _templates(out: Path) -> dict[str, list[Path]]:
    chest = chest_study(out, seed=7, size="real", nodules=1, transfer_syntax="j2k-lossless")
    mammo = mammo_study(out, seed=7, size="real", masses={"L": 1}, transfer_syntax="j2k-lossless")
    return {"chest": [Path(f) for f in chest["files"]], "mammo": [Path(f) for f in mammo["files"]]}


def _copy(template: list[Path], out: Path) -> list[Path]:
    """The same images as a new study (new study/series/SOP UIDs), pixel data untouched."""
    study, series = generate_uid(), generate_uid()
    files = []
    for path in template:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        files.append(out / f"{ds.SOPInstanceUID}.dcm")
        out.mkdir(parents=True, exist_ok=True)
        ds.save_as(files[-1], enforce_file_format=True)
    return files


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    home = tmp / "home"
    pacs = Orthanc(tmp / "pacs").start()
    templates = _templates(tmp / "templates")
    cfg = (
        '[engines]\nbackend = "ort"\n[pipeline]\nenabled = true\n'
        f'[[pipeline.destinations]]\nname = "pacs"\nae_title = "{AET}"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
    )
    env = {
        "APPLIANCE_PIPELINE__ENABLED": "true",
        "APPLIANCE_PIPELINE__POLL_S": "0.05",
        "APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES": "true",
    }
    try:
        with running_daemon(home, config_toml=cfg, env=env) as d:
            for kind in ("chest", "mammo"):
                stages: dict[str, list[float]] = {
                    k: []
                    for k in (
                        "receive",
                        "completion wait",
                        "preprocess",
                        "inference",
                        "result building",
                        "export",
                        "total",
                    )
                }
                for i in range(args.n + 1):  # first study warms up (lazy imports, engine load): not counted
                    files = _copy(templates[kind], tmp / f"{kind}{i}")
                    t0 = time.time()
                    r = storescu(d.port, files, "-xv")
                    t1 = time.time()
                    assert "Success" in r.stdout, r.stdout[-800:]
                    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                    while True:
                        row = d.query("SELECT id, state, completed_at FROM studies WHERE study_uid=?", (uid,))
                        if row and row[0]["state"] in ("exported", "failed", "not_processable", "no_model"):
                            break
                        time.sleep(0.01)
                    sid = row[0]["id"]
                    assert row[0]["state"] == "exported", row[0]["state"]
                    ev = {
                        e["to_state"]: e["at"]
                        for e in d.query("SELECT to_state, at FROM study_events WHERE study_id=?", (sid,))
                    }
                    timings = json.loads(d.query("SELECT timings FROM results WHERE study_id=?", (sid,))[0]["timings"])
                    if i == 0:
                        continue
                    stages["receive"].append(t1 - t0)
                    stages["completion wait"].append(ev["complete"] - t1)
                    stages["preprocess"].append(timings["preprocess"])
                    stages["inference"].append(timings["inference"])
                    stages["result building"].append(
                        timings.get(
                            "results", ev["inferred"] - ev["inferring"] - timings["preprocess"] - timings["inference"]
                        )
                    )
                    stages["export"].append(ev["exported"] - ev["inferred"])
                    stages["total"].append(ev["exported"] - t0)
                print(f"\n{kind}: {args.n} studies ({'1 x 2500x2048' if kind == 'chest' else '4 x 3328x2560'} J2K)")
                print(f"{'stage':<18} {'p50 ms':>8} {'p95 ms':>8}")
                for k, v in stages.items():
                    print(f"{k:<18} {_pct(v, 50):>8.0f} {_pct(v, 95):>8.0f}")
                budget = [
                    a + b + c + e
                    for a, b, c, e in zip(
                        stages["receive"],
                        stages["preprocess"],
                        stages["result building"],
                        stages["export"],
                        strict=True,
                    )
                ]
                print(f"{'all but inference+completion wait':<34} p50 {_pct(budget, 50):.0f} ms (target <= 300)")
    finally:
        pacs.stop()


if __name__ == "__main__":
    main()
