"""Pipeline test data: a tiny deterministic ONNX "detector" and synthetic DICOM with known truth.

The model: heatmap = average-pool(input, stride) (so its peak sits on the brightest blob), score =
global max of the heatmap. Run by ONNX Runtime directly; the manifest is a real ``engines.manifest.Manifest``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from engines.manifest import Manifest

SIZE = 128
STRIDE = 8


def tiny_model_bytes(size: int = SIZE, stride: int = STRIDE) -> bytes:
    """The serialised ONNX model: image (N,1,size,size) -> heatmap (N,1,size/stride,size/stride), scores (N,1)."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])
    heat = helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", 1, size // stride, size // stride])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 1])
    nodes = [
        helper.make_node(
            "AveragePool", ["image"], ["heatmap"], kernel_shape=[stride, stride], strides=[stride, stride]
        ),
        helper.make_node("GlobalMaxPool", ["heatmap"], ["gmax"]),
        helper.make_node("Flatten", ["gmax"], ["scores"], axis=1),
    ]
    graph = helper.make_graph(nodes, "tiny", [x], [heat, scores])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tiny_manifest(
    task: str = "cxr", label: str = "nodule", window: str = "dicom", modalities: tuple[str, ...] = ("DX", "CR")
) -> Manifest:
    """A manifest for :func:`tiny_model_bytes`: one ``label`` (threshold 0.3) with a heatmap of stride ``STRIDE``."""
    return Manifest(
        bundle_id=f"tiny-{task}",
        version="1.0.0",
        task=task,
        title="tiny test detector",
        clinical_use=False,
        applies_to={"modalities": list(modalities)},
        inputs=[
            {
                "name": "image",
                "shape": ["N", 1, SIZE, SIZE],
                "preprocessing": {"target_size": [SIZE, SIZE], "window": window},
            }
        ],
        outputs=[
            {"name": "scores", "kind": "scores", "labels": [label], "activation": "none", "thresholds": {label: 0.3}},
            {"name": "heatmap", "kind": "heatmap", "labels": [label], "activation": "none", "stride": STRIDE},
        ],
        golden_tolerances={
            "scores": {"fp32": {"atol": 1e-4, "rtol": 1e-3}},
            "heatmap": {"fp32": {"atol": 1e-4, "rtol": 1e-3}},
        },
        created=dt.datetime.now(dt.timezone.utc).isoformat(),
        expires=(dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=365)).isoformat(),
        files={"model.onnx": "0" * 64, "golden.npz": "0" * 64},
        file_sizes={"model.onnx": 0, "golden.npz": 0},
    )


class TinyEngine:
    """Stand-in for engines' Engine (same ``infer`` / ``max_batch`` surface), on ONNX Runtime."""

    def __init__(self, max_batch: int = 8):
        self.session = ort.InferenceSession(tiny_model_bytes(), providers=["CPUExecutionProvider"])
        self.max_batch = max_batch
        self.calls = 0

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: ``{"image": (N,1,SIZE,SIZE)}`` -> ``{"heatmap": ..., "scores": (N,1)}``; counts calls."""
        self.calls += 1
        heat, scores = self.session.run(["heatmap", "scores"], inputs)
        return {"heatmap": heat, "scores": scores}


def synthetic_image(
    rows: int,
    cols: int,
    nodule: tuple[float, float] | None,
    radius: float = 20.0,
    *,
    background: int = 200,
    peak: int = 3000,
) -> np.ndarray:
    """Dark background with a bright Gaussian blob centred at ``nodule`` (row, col) original pixel indices."""
    img = np.full((rows, cols), float(background))
    if nodule is not None:
        rr, cc = np.mgrid[0:rows, 0:cols]
        img += peak * np.exp(-((rr - nodule[0]) ** 2 + (cc - nodule[1]) ** 2) / (2 * radius**2))
    return img.astype(np.uint16)


def make_dataset(
    pixels: np.ndarray,
    *,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    spacing: tuple[float, float] = (0.2, 0.2),
    study_uid: str | None = None,
    laterality: str | None = None,
    view: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    window: tuple[float, float] | None = None,
) -> Dataset:
    """A minimal valid DX/MG image dataset (optionally compressed)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Patient"
    ds.PatientID = "P123"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "Test"
    ds.ReferringPhysicianName = ""
    ds.BodyPartExamined = "BREAST" if modality == "MG" else "CHEST"
    if laterality:
        ds.ImageLaterality = laterality
    if view:
        ds.ViewPosition = view
    ds.PatientOrientation = ["P", "F"]
    ds.ImagerPixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.clip(pixels, 0, 4095).astype(np.uint16).tobytes()
    if transfer_syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(transfer_syntax)
    elif transfer_syntax != ExplicitVRLittleEndian:
        raise ValueError(f"cannot encode {transfer_syntax} here")
    return ds


def save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a Part-10 file at ``path`` (parents created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
