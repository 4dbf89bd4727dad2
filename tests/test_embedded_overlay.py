"""An overlay kept in the unused high bits of Pixel Data (issue 16, item 3, last bullet) is drawn nowhere.

The retired embedded form (PS3.3 C.9.2.1.1): Overlay Bits Allocated (60xx,0100) = Bits Allocated and Overlay Bit
Position (60xx,0102) above High Bit. PS3.5 8.1.1: only the Bits Stored bits are the pixel value. Here a bright
pattern in bit 15 of a 12-bit chest phantom; the same phantom without it is the truth. The model input, the display
image and the SC's pixels must equal those of the clean image, for every transfer syntax: pydicom clears the unused
bits of native data itself but not of JPEG 2000 or JPEG-LS codestreams that carry the whole 16-bit cell.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from appliance.pipeline.analyse import Analysis, analyse
from appliance.pipeline.preprocess import stored_bits
from appliance.pipeline.results_sc import build_sc
from engines.reference.phantoms import chest_phantom, to_dicom
from testsupport.pipeline import TinyEngine, tiny_manifest

SIZE = (1400, 1150)  # larger than the SC's 1024: the display is reduced, then drawn
OVERLAY_BIT = 15

_ELEMENTS = {  # (60xx,eeee) element, VR (PS3.6)
    "OverlayRows": (0x0010, "US"),
    "OverlayColumns": (0x0011, "US"),
    "OverlayType": (0x0040, "CS"),
    "OverlayOrigin": (0x0050, "SS"),
    "OverlayBitsAllocated": (0x0100, "US"),
    "OverlayBitPosition": (0x0102, "US"),
}


def _pattern(shape: tuple[int, int]) -> np.ndarray:
    """Bars and a frame, as annotation overlays look, across the lungs and the mediastinum."""
    m = np.zeros(shape, dtype=bool)
    rows, cols = shape
    for k in range(6):
        r = rows // 5 + k * rows // 10
        m[r : r + 12, cols // 8 : 7 * cols // 8] = True
    m[rows // 3 : 2 * rows // 3, cols // 2 - 6 : cols // 2 + 6] = True
    m[40:50, :] = m[-50:-40, :] = True
    return m


def _image(overlay: bool, syntax: str | None) -> Dataset:
    ds = to_dicom(chest_phantom(*SIZE, seed=3, nodules=1).pixels, bits_stored=12)
    cells = ds.pixel_array.copy()
    assert cells.max() < 4096  # 12 bits stored, High Bit 11
    if overlay:
        cells[_pattern(cells.shape)] |= 1 << OVERLAY_BIT
        values = {"OverlayRows": SIZE[0], "OverlayColumns": SIZE[1], "OverlayType": "G", "OverlayOrigin": [1, 1]}
        values |= {"OverlayBitsAllocated": 16, "OverlayBitPosition": OVERLAY_BIT}
        for keyword, value in values.items():
            element, vr = _ELEMENTS[keyword]
            ds.add_new(0x60000000 | element, vr, value)
    ds.PixelData = cells.tobytes()
    if syntax is not None:  # a modality that compresses the whole 16-bit cell, overlay bit included
        ds.BitsStored, ds.HighBit = 16, 15
        ds.compress(syntax, cells)
        ds.BitsStored, ds.HighBit = 12, 11
    return ds


@pytest.fixture(scope="module")
def engine() -> TinyEngine:
    return TinyEngine()


def _analysed(ds: Dataset, engine: TinyEngine) -> Analysis:
    return analyse([ds], tiny_manifest(), engine.infer, 8, 10**8)


def _sc_pixels(a: Analysis) -> np.ndarray:
    img, src, prep = a.result.images[0], a.sources[0], a.prepared[0]
    return build_sc(img, src, prep.display, a.result, 0, 1024, prep.display_factor).pixel_array


@pytest.mark.parametrize("syntax", [None, RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=str)
def test_embedded_overlay_reaches_neither_the_model_nor_the_display_nor_the_sc(syntax: Any, engine) -> None:
    clean, marked = _image(False, syntax), _image(True, syntax)
    if syntax is None:  # the pattern really is in the cells the modality sent
        raw = np.frombuffer(marked.PixelData, dtype="<u2").reshape(SIZE)
        assert ((raw >> OVERLAY_BIT) & 1).astype(bool).tolist() == _pattern(SIZE).tolist()
    assert marked[0x60000102].value == OVERLAY_BIT and marked[0x60000100].value == marked.BitsAllocated == 16
    a, b = _analysed(clean, engine), _analysed(marked, engine)
    assert not a.skipped and not b.skipped and len(a.prepared) == len(b.prepared) == 1
    pa, pb = a.prepared[0], b.prepared[0]
    np.testing.assert_array_equal(pb.tensor, pa.tensor)  # the model input is unchanged
    np.testing.assert_array_equal(pb.display, pa.display)
    sa, sb = _sc_pixels(a), _sc_pixels(b)
    assert sa.shape == sb.shape
    assert int(np.abs(sa.astype(np.int16) - sb.astype(np.int16)).max()) <= 1  # no trace of the pattern


def test_stored_bits_keeps_bits_stored_and_sign_extends() -> None:
    """PS3.5 8.1.1 / C.7.6.3.1.1: unsigned 12-bit values lose bits 12-15; signed ones are sign-extended from High Bit
    11 whatever bits 12-15 hold (an overlay bit 15 of 0 under a negative value, of 1 under a positive one)."""
    ds = Dataset()
    ds.BitsStored = 12
    unsigned = np.array([[0x8000 | 100, 0xF000 | 4095, 7]], dtype=np.uint16)
    assert stored_bits(ds, unsigned).tolist() == [[100, 4095, 7]]
    signed = np.array([[0x0FFB, 0x8005, 0x7800]], dtype=np.uint16).view(np.int16)
    assert stored_bits(ds, signed).tolist() == [[-5, 5, -2048]]
    full = np.array([[0xFFFF]], dtype=np.uint16)
    ds.BitsStored = 16
    assert stored_bits(ds, full).tolist() == [[0xFFFF]]
