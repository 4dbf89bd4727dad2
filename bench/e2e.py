"""End-to-end latency: storescu -> appliance daemon -> SR stored in Orthanc, p50/p95 per stage.

Studies: a 1-image chest (2500x2048, 12-bit, J2K lossless) and a 4-view mammogram (2560x2048 per view,
J2K lossless), each sent with dcmtk ``storescu`` to a running daemon whose PACS destination is a real
Orthanc. The bundle is the tiny deterministic detector from ``tests/pipeline_tools`` (signed and installed
like any bundle), so "inference" here is a near-zero floor: real models add their own inference time.

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

from pydicom.uid import JPEG2000Lossless, generate_uid  # noqa: E402

from tests.daemon_tools import running_daemon, storescu  # noqa: E402
from tests.orthanc_tools import Orthanc  # noqa: E402
from tests.pipeline_tools import make_dataset, save, synthetic_image  # noqa: E402
from tests.test_pipeline_e2e import _config, install_tiny_bundle  # noqa: E402


def _study(kind: str, out: Path, rng: np.random.Generator) -> list[Path]:
    study = generate_uid()
    if kind == "chest":
        img = synthetic_image(2500, 2048, (900, 1300), radius=50) + rng.integers(0, 64, (2500, 2048), dtype=np.uint16)
        return [save(make_dataset(img, study_uid=study, transfer_syntax=JPEG2000Lossless), out / f"{study}.dcm")]
    files = []
    for side in "LR":
        for view in ("CC", "MLO"):
            lesion = (800, 700) if side == "R" else None
            img = synthetic_image(2560, 2048, lesion, radius=40) + rng.integers(0, 64, (2560, 2048), dtype=np.uint16)
            ds = make_dataset(
                img, modality="DX", laterality=side, view=view, study_uid=study, transfer_syntax=JPEG2000Lossless
            )
            files.append(save(ds, out / f"{study}-{side}{view}.dcm"))
    return files


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    home = tmp / "home"
    kid, pub = install_tiny_bundle(home, tmp / "bundle")
    pacs = Orthanc(tmp / "pacs").start()
    rng = np.random.default_rng(0)
    try:
        with running_daemon(
            home,
            config_toml=_config(home, pacs, kid, pub),
            env={"APPLIANCE_PIPELINE__ENABLED": "true", "APPLIANCE_PIPELINE__POLL_S": "0.05"},
        ) as d:
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
                    files = _study(kind, tmp / f"{kind}{i}", rng)
                    t0 = time.time()
                    r = storescu(d.port, files, "-xv")
                    t1 = time.time()
                    assert "Success" in r.stdout, r.stdout[-800:]
                    import pydicom

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
                print(f"\n{kind}: {args.n} studies ({'1 x 2500x2048' if kind == 'chest' else '4 x 2560x2048'} J2K)")
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
