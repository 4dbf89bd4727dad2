"""Phantoms: truth is where the pixels say it is, and the DICOM writer produces decodable, realistic files."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from engines.reference import phantoms as P


def test_chest_truth_matches_pixels() -> None:
    ph = P.chest_phantom(320, 256, seed=5, nodules=2, effusion="left", cardiomegaly=True)
    json.dumps(ph.truth)  # serialisable
    assert ph.truth["labels"] == {"nodule": 1, "effusion": 1, "cardiomegaly": 1}
    clean = P.chest_phantom(320, 256, seed=5, nodules=0, effusion="left", cardiomegaly=True, noise=0)
    noisy = P.chest_phantom(320, 256, seed=5, nodules=2, effusion="left", cardiomegaly=True, noise=0)
    for f in (f for f in ph.truth["findings"] if f["kind"] == "nodule"):
        x, y = f["center_xy"]
        diff = noisy.pixels - clean.pixels
        # the nodule adds density at its centre and not far outside its radius
        assert diff[round(y), round(x)] > 0.1
        assert diff[round(y), min(255, round(x + 2.5 * f["radius"]))] < 0.02
    eff = next(f for f in ph.truth["findings"] if f["kind"] == "effusion")
    assert eff["side"] == "left" and 0 < eff["level_y"] < 320


def test_chest_labels_follow_arguments() -> None:
    normal = P.chest_phantom(seed=1)
    assert normal.truth["labels"] == {"nodule": 0, "effusion": 0, "cardiomegaly": 0}
    assert normal.truth["findings"] == []
    assert normal.pixels.dtype == np.float32 and normal.pixels.min() >= 0 and normal.pixels.max() <= 1


def test_mammo_study_four_views_one_study(tmp_path) -> None:
    st = P.mammo_study(tmp_path, seed=3, masses={"L": 1})
    assert len(st["files"]) == 4
    seen = set()
    for path, truth in zip(st["files"], st["truth"], strict=True):
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == st["study_uid"]
        assert ds.Modality == "MG" and ds.SOPClassUID == P.SOP_CLASS["MG"]
        assert ds.ImageLaterality == truth["laterality"] and ds.ViewPosition == truth["view"]
        seen.add((ds.ImageLaterality, ds.ViewPosition))
        assert truth["labels"]["mass"] == (1 if truth["laterality"] == "L" else 0)
        arr = ds.pixel_array.astype(float)
        for f in truth["findings"]:
            x, y = f["center_xy"]
            # the mass is denser than the ring around it
            ring = arr[round(y), min(arr.shape[1] - 1, round(x + 2.2 * f["radius"]))]
            assert arr[round(y), round(x)] > ring
    assert seen == set(P.MMG_VIEWS)


@pytest.mark.parametrize("ts", sorted(P.TRANSFER_SYNTAX))
def test_dicom_roundtrip_lossless(tmp_path, ts: str) -> None:
    if ts == "jpegls-lossless":
        pytest.importorskip("jpeg_ls", reason="JPEG-LS encoder (pyjpegls) not installed")
    ph = P.chest_phantom(96, 80, seed=2, nodules=1)
    ds = P.to_dicom(
        ph.pixels,
        modality="CR",
        bits_stored=14,
        photometric="MONOCHROME1",
        rescale=(2.0, -100.0),
        pixel_spacing=(0.15, 0.1),
        transfer_syntax=ts,
    )
    path = P.write_dicom(ds, tmp_path / "x.dcm")
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == P.TRANSFER_SYNTAX[ts]
    assert back.SOPInstanceUID == ds.SOPInstanceUID  # compression keeps the UID
    stored = back.pixel_array.astype(np.int64)
    expected = 16383 - np.round(ph.pixels * 16383).astype(np.int64)  # MONOCHROME1 is inverted
    assert np.array_equal(stored, expected)
    assert back.BitsStored == 14 and back.PhotometricInterpretation == "MONOCHROME1"
    assert [float(v) for v in back.PixelSpacing] == [0.15, 0.1]
    assert float(back.RescaleSlope) == 2.0 and float(back.RescaleIntercept) == -100.0
    assert back.PatientName == "PHANTOM^JANE^Q" and back.PatientBirthDate


def test_chest_study_real_size_and_voi_lut(tmp_path) -> None:
    st = P.chest_study(tmp_path, seed=9, size="real", nodules=1, voi_lut=True, transfer_syntax="rle")
    ds = pydicom.dcmread(st["files"][0])
    assert (ds.Rows, ds.Columns) == P.CHEST_SIZE_REAL
    assert "VOILUTSequence" in ds and ds.WindowWidth > 0
    truth = st["truth"][0]
    x, y = truth["findings"][0]["center_xy"]
    assert 0 < x < ds.Columns and 0 < y < ds.Rows
