"""Phantom studies for acceptance tests that ``engines.reference.phantoms`` does not write directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engines.reference import phantoms as P


def anisotropic_chest(
    out_dir: Path, seed: int, rows: int = 320, cols: int = 240, spacing: tuple[float, float] = (0.12, 0.16)
) -> dict[str, Any]:
    """A chest with non-square pixels and normal anatomy: drawn on a square-pixel grid of the same physical
    size, then resampled (Pillow bilinear, independent of the pipeline's resampler) to ``cols`` columns.

    Labelling an ordinary phantom with non-square spacing would describe a physically squashed chest;
    here the physical image is a normal chest and only the pixel grid is anisotropic, as on a real detector.
    """
    sr, sc = spacing
    wide = round(cols * sc / sr)
    ph = P.chest_phantom(rows, wide, seed=seed, nodules=1)
    img = Image.fromarray(np.ascontiguousarray(ph.pixels, dtype=np.float32), mode="F")
    pixels = np.asarray(img.resize((cols, rows), Image.Resampling.BILINEAR), dtype=np.float32)
    k = cols / wide
    study_uid = P.synthetic_uid("cxr-aniso", seed, rows, cols, spacing)
    ds = P.to_dicom(pixels, study_uid=study_uid, pixel_spacing=spacing, patient_orientation=("L", "F"))
    path = P.write_dicom(ds, Path(out_dir) / f"aniso_{seed}" / f"{ds.SOPInstanceUID}.dcm")
    truth = dict(ph.truth, columns=cols, sop_instance_uid=ds.SOPInstanceUID, file=str(path))
    truth["findings"] = [
        dict(f, center_xy=[(f["center_xy"][0] + 0.5) * k - 0.5, f["center_xy"][1]]) if "center_xy" in f else f
        for f in ph.truth["findings"]
    ]
    return {"study_uid": study_uid, "files": [str(path)], "truth": [truth]}
