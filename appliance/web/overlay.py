"""The study page's overlay images: a result SC (DICOM Secondary Capture) served as PNG, from the state dir only.

The read model gives each result object's path relative to the state directory.
:func:`appliance.core.safe_names.resolve_under` (the one check every reader of stored paths uses) refuses
any path that leaves that directory (``..``, an absolute path, a symlink pointing out) before a file is opened,
so the route that serves overlays cannot be turned into a file reader.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_voi_lut, convert_color_space


def sc_to_png(path: Path, max_side: int = 2048) -> bytes:
    """PNG bytes of the first frame of a DICOM image (RGB, YBR or MONOCHROME1/2), downscaled to ``max_side``.

    Raises ``pydicom.errors.InvalidDicomError`` / ``ValueError`` / ``OSError`` for a file that is not a
    displayable DICOM image.
    """
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("YBR"):
        arr = convert_color_space(arr, photometric, "RGB")
        photometric = "RGB"
    if photometric == "RGB":
        image = Image.fromarray(arr.astype(np.uint8), "RGB")
    else:
        if "WindowCenter" in ds:
            arr = apply_voi_lut(arr, ds)
        arr = arr.astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        if photometric == "MONOCHROME1":
            scaled = 255.0 - scaled
        image = Image.fromarray(scaled.astype(np.uint8), "L")
    image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
