"""Cost of decoding JPEG 2000 in full (what preprocessing does now) against the reduced-resolution decode it
dropped, on a mammogram-sized image (3328 x 2560, 14 bits, JPEG 2000 lossless, reference MG phantom).

    PYTHONPATH=. python bench/decode.py [--runs 5]

Prints medians (ms) of: the full decode (pydicom -> pylibjpeg-openjpeg, what ``prepare`` decodes), the dropped
reduced decode (Pillow/OpenJPEG ``reduce`` at the level the old code chose for the mmg-phantom input, 2**3), the
uncompressed decode for scale, and the stages of ``prepare`` after decoding (grayscale chain, resample to the
model input, display reduction) and ``prepare`` in all. Each decode reads the dataset afresh from bytes (pydicom
caches ``pixel_array``). A few seconds of CPU; prints figures only.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.encaps import generate_frames  # noqa: E402
from pydicom.uid import JPEG2000Lossless  # noqa: E402

from appliance.pipeline import preprocess as P  # noqa: E402
from engines.manifest import Preprocessing  # noqa: E402
from engines.reference.phantoms import mammo_phantom, to_dicom  # noqa: E402

MMG = Preprocessing(target_size=(256, 256), window="dicom")  # the mmg-phantom bundle's preprocessing
SIZE = (3328, 2560)  # a typical FFDM detector
OLD_LEVEL = 3  # what the dropped decode_reduced chose for a 256 x 197 model content: 2**3 smaller per axis


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm (imports, plugin discovery)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    ph = mammo_phantom(*SIZE, laterality="L", view="CC", seed=3, masses=[(0.4, 0.5, 0.03)])
    tags = dict(modality="MG", bits_stored=14, pixel_spacing=(0.07, 0.07), body_part="BREAST", view_position="CC")
    tags.update(laterality="L", patient_orientation=("A", "R"))
    plain = to_dicom(ph.pixels, **tags)
    j2k = to_dicom(ph.pixels, transfer_syntax="j2k-lossless", **tags)
    assert j2k.file_meta.TransferSyntaxUID == JPEG2000Lossless
    blobs = {}
    for name, ds in (("explicit", plain), ("j2k", j2k)):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        blobs[name] = buf.getvalue()
    frame = next(generate_frames(j2k.PixelData, number_of_frames=1))

    def full(name: str) -> np.ndarray:
        return dcmread(io.BytesIO(blobs[name])).pixel_array

    def reduced() -> np.ndarray:
        with Image.open(io.BytesIO(frame)) as im:
            im.reduce = OLD_LEVEL
            im.load()
            return np.asarray(im)

    ds = dcmread(io.BytesIO(blobs["j2k"]))
    stored = ds.pixel_array
    img, view = P.grayscale(ds, stored, MMG)
    tf = P.plan_transform(img.shape, P.pixel_spacing(ds), MMG)
    rows = {
        "decode J2K lossless, full resolution (now)": median_ms(lambda: full("j2k"), args.runs),
        f"decode J2K lossless, reduced 2**{OLD_LEVEL} (dropped)": median_ms(reduced, args.runs),
        "decode uncompressed (for scale)": median_ms(lambda: full("explicit"), args.runs),
        "grayscale chain (modality, VOI, presentation)": median_ms(lambda: P.grayscale(ds, stored, MMG), args.runs),
        "resample to the model input": median_ms(lambda: P.fit(img, tf, 0.0), args.runs),
        "display image (1024 long side)": median_ms(lambda: P.display_image(view), args.runs),
        "prepare() in all, J2K": median_ms(lambda: P.prepare(dcmread(io.BytesIO(blobs["j2k"])), MMG, 10**9), args.runs),
    }
    print(f"{SIZE[0]}x{SIZE[1]} 14-bit MG, J2K {len(blobs['j2k']) / 1e6:.1f} MB, {args.runs} runs, "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}")  # fmt: skip
    for name, ms in rows.items():
        print(f"  {name:<52} {ms:8.1f} ms")
    extra = (
        rows["decode J2K lossless, full resolution (now)"]
        - rows[f"decode J2K lossless, reduced 2**{OLD_LEVEL} (dropped)"]
    )
    print(f"  {'cost of dropping the reduced decode (per image)':<52} {extra:8.1f} ms")


if __name__ == "__main__":
    main()
