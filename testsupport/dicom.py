"""Synthetic DICOM instances for tests and benchmarks (small, valid, uncompressed CT/CR images)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid


def make_instance(
    study_uid: str,
    series_uid: str,
    number: int,
    rows: int = 64,
    cols: int = 64,
    sop_class: str = CTImageStorage,
    modality: str = "CT",
    seed: int | None = None,
) -> Dataset:
    """One 16-bit monochrome image with distinct pixel content (``seed`` varies the bytes)."""
    rng = np.random.default_rng(number if seed is None else seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "TEST0001"
    ds.StudyDate = "20250101"
    ds.InstanceNumber = number
    ds.SeriesNumber = 1
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    return ds


def write_series(
    directory: Path,
    n: int,
    study_uid: str | None = None,
    series_uid: str | None = None,
    rows: int = 64,
    cols: int = 64,
    prefix: str = "img",
) -> list[Path]:
    """``n`` instances of one series as Part-10 files in ``directory``; returns their paths in order."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths = []
    for i in range(n):
        ds = make_instance(study_uid, series_uid, i + 1, rows, cols)
        path = directory / f"{prefix}{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_bytes(data: bytes) -> bytes:
    """The data set of Part-10 bytes: everything after the file meta group."""
    if data[128:132] != b"DICM":
        raise ValueError("not a Part-10 file")
    # (0002,0000) UL group length, explicit VR LE: tag(4) VR(2) len(2) value(4) at offset 132
    (group_len,) = struct.unpack("<I", data[140:144])
    return data[144 + group_len :]


def part10(sop_class: str, sop_uid: str, transfer_syntax: str, dataset: bytes) -> bytes:
    """Part-10 bytes with a valid file meta around arbitrary (possibly malformed) data set bytes."""
    from pydicom.dataset import FileMetaDataset
    from pynetdicom.dsutils import encode_file_meta

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + dataset


def file_dataset_offset(path: Path) -> int:
    """Where the data set starts in a (possibly odd) Part-10 file."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.tell()


def spool_data_files(spool_root: Path) -> list[Path]:
    """Files in a spool that hold data: the empty ones are the reserve (``Spool.take``), not instances."""
    return sorted(p for p in Path(spool_root).rglob("*") if p.is_file() and p.stat().st_size > 0)
