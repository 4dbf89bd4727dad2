"""Acceptance with the REAL reference bundles and phantoms: dcmtk storescu (modality) -> the daemon (reference
bundles installed on first run, ONNX Runtime) -> Orthanc (PACS), checked through Orthanc's REST API.

Chest phantoms with one nodule at a known centre, as MONOCHROME1, with non-square pixels, and as J2K / JPEG
lossless / RLE (one a realistic 2500x2048 J2K): the SR and one SC per image land in the same study, and the
SR's nodule point is within 2 % of the image size of the truth. A normal chest gets no nodule. 4-view
mammograms with a mass in one breast get that breast's score above its threshold and above the other's.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest

from appliance.pipeline.results_sr import read_sr_points
from engines.reference.phantoms import chest_study, mammo_study
from testsupport.common import wait_until
from testsupport.daemon import running_daemon
from testsupport.dcmtk import storescu
from testsupport.orthanc import AET, Orthanc
from testsupport.phantoms import anisotropic_chest

pytestmark = pytest.mark.integration

# dcmtk storescu: propose exactly the file's transfer syntax (else it may transcode)
TS_FLAG = {"1.2.840.10008.1.2.4.90": ["-xv"], "1.2.840.10008.1.2.5": ["-xr"], "1.2.840.10008.1.2.4.70": ["-xs"]}


ENV = {"APPLIANCE_PIPELINE__ENABLED": "true", "APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES": "true"}


def _config(pacs: Orthanc) -> str:
    return (
        '[engines]\nbackend = "ort"\n'
        "[pipeline]\nenabled = true\npoll_s = 0.2\nretry_initial_s = 0.5\n"
        f'[[pipeline.destinations]]\nname = "pacs"\nae_title = "{AET}"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
    )


def _send(port: int, files: list[str]) -> None:
    ts = str(pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    out = storescu(port, files, "-R", *TS_FLAG.get(ts, []))
    assert out.stdout.count("Received Store Response (Success)") == len(files), out.stdout


def _results(pacs: Orthanc, study_uid: str, n_images: int) -> tuple[pydicom.Dataset, list[dict]]:
    """Wait for the SR and one SC per image in the study; return the SR (from Orthanc) and the SC tags."""

    def ready() -> list[dict] | None:
        tags = pacs.instances_of_study(study_uid)
        kinds = sorted(t.get("Modality") for t in tags)
        return tags if kinds == sorted(["SR"] + ["OT"] * n_images) else None

    tags = wait_until(ready, timeout=90, interval=0.3, what=f"SR + {n_images} SC in Orthanc for {study_uid}")
    sr_tags = next(t for t in tags if t["Modality"] == "SR")
    sr = pydicom.dcmread(io.BytesIO(pacs.instance_file(sr_tags["_id"])))
    scs = [t for t in tags if t["Modality"] == "OT"]
    # one SC series per laterality (a mammogram's L and R views never share one), none of them the SR's
    by_series: dict[str, set[str]] = {}
    for t in scs:
        by_series.setdefault(t["SeriesInstanceUID"], set()).add(t.get("Laterality") or "")
    assert all(len(sides) == 1 for sides in by_series.values()), by_series
    assert len(by_series) == len({side for sides in by_series.values() for side in sides})
    assert sr.SeriesInstanceUID not in by_series
    return sr, scs


def _num_items(sr: pydicom.Dataset) -> dict[str, float]:
    """Every NUM content item of the SR: concept meaning -> value (last wins)."""
    out: dict[str, float] = {}

    def walk(items) -> None:
        for item in items:
            if item.ValueType == "NUM":
                name = item.ConceptNameCodeSequence[0].CodeMeaning
                out[name] = float(item.MeasuredValueSequence[0].NumericValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return out


def test_reference_bundles_end_to_end_through_orthanc(home: Path, tmp_path: Path, orthanc: Orthanc) -> None:
    src = tmp_path / "in"
    chests = {
        "mono1": chest_study(src, seed=21, photometric="MONOCHROME1"),
        "nonsquare": anisotropic_chest(src, seed=40, spacing=(0.12, 0.16)),
        "j2k-2500x2048": chest_study(src, seed=26, size="real", transfer_syntax="j2k-lossless"),
        "jpeg-lossless": chest_study(src, seed=24, transfer_syntax="jpeg-lossless"),
        "rle": chest_study(src, seed=25, transfer_syntax="rle"),
    }
    normal = chest_study(src, seed=27, nodules=0)
    mammos = {side: mammo_study(src / side, seed=5 if side == "L" else 6, masses={side: 1}) for side in ("L", "R")}
    with running_daemon(home, config_toml=_config(orthanc), env=ENV) as d:
        for study in [*chests.values(), normal, *mammos.values()]:
            _send(d.port, study["files"])

        errors = {}
        for name, study in chests.items():
            truth = study["truth"][0]
            sr, _ = _results(orthanc, study["study_uid"], 1)
            points = [p for p in read_sr_points(sr) if p["finding"] == "Nodule"]
            assert len(points) == 1 and points[0]["sop_uid"] == truth["sop_instance_uid"], (name, points)
            x, y = next(f["center_xy"] for f in truth["findings"] if f["kind"] == "nodule")
            errors[name] = (abs(points[0]["row"] - y) / truth["rows"], abs(points[0]["col"] - x) / truth["columns"])
        print(
            "nodule error (rows, cols) as a fraction of the image:",
            {k: (round(a, 4), round(b, 4)) for k, (a, b) in errors.items()},
        )
        for name, (er, ec) in errors.items():
            assert er <= 0.02 and ec <= 0.02, f"{name}: nodule off by {er:.2%} of rows, {ec:.2%} of columns"

        sr, _ = _results(orthanc, normal["study_uid"], 1)
        assert not [p for p in read_sr_points(sr) if p["finding"] == "Nodule"]

        for side, study in mammos.items():
            sr, scs = _results(orthanc, study["study_uid"], 4)
            scores = _num_items(sr)
            left, right = scores["AI left breast score"], scores["AI right breast score"]
            mass, other = (left, right) if side == "L" else (right, left)
            assert mass > other, (side, scores)
            summary = d.query(
                "SELECT summary FROM results WHERE study_uid=? AND bundle_id='mmg-phantom'", (study["study_uid"],)
            )[0]["summary"]
            findings = json.loads(summary)["findings"]
            thr = findings[0]["threshold"]
            assert mass >= thr > other, (side, scores, thr)
            # the positive views are exactly the two views of the breast with the mass
            assert {(f["laterality"], f["view"]) for f in findings if f["positive"]} == {(side, "CC"), (side, "MLO")}
            assert {t.get("ImageLaterality") or t.get("Laterality") for t in scs} <= {"L", "R", None}
        wait_until(lambda: len(d.studies("exported")) == len(chests) + 3, timeout=30, what="all studies exported")
