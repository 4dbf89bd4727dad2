"""DICOM image -> model input tensor, exactly as a bundle's ``Preprocessing`` says, plus the transform back.

Order (the grayscale pipeline of PS3.3 C.11 / PS3.4 N.2 / PS3.14): decode (full resolution, any transfer
syntax: the same stored values for every lossless encoding) -> modality LUT (Modality LUT Sequence or rescale)
-> VOI (VOI LUT Sequence, window with its VOI LUT Function, per the manifest's window policy; Pixel Padding
Value / Range Limit pixels left out of every statistic) -> presentation (Presentation LUT Shape, else
MONOCHROME1) -> padding set to the manifest's ``pad_value`` -> reorientation to the manifest's orientation
(Patient Orientation; rotations by 90 degrees and flips) -> resample to square pixels (Pixel Spacing, else Pixel
Aspect Ratio) and fit into the target size (area averaging, vectorised) -> centred pad -> (x - mean) / std. The
SC overlay's display image is the same view, as stored (not reoriented), reduced to ``DISPLAY_LONG_SIDE``.
Both start from the same stored values (:func:`decode`: unused high bits, e.g. an embedded overlay, masked by
:func:`stored_bits`).

Every refusal (decompression bomb, colour image, 1x1, missing pixel data, undecodable) raises
:class:`NotProcessable` with a reason a person can act on; the geometry is recorded in a :class:`Transform`
so heatmap peaks and contours can be drawn on the original image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian

from appliance.pipeline.anatomy import defined_term, laterality_of
from engines.manifest import OPPOSITE_DIRECTION, Orientation, Preprocessing

MONO = ("MONOCHROME1", "MONOCHROME2")
MAX_DIM = 65535  # Rows/Columns are US: anything larger is a corrupt header
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")  # PS3.3 C.11.2.1.3; another value: LINEAR (as dcmtk)
PRESENTATION_SHAPES = ("IDENTITY", "INVERSE")  # PS3.3 C.11.6.1.1 values an image carries
DISPLAY_LONG_SIDE = 1024  # long side of the display image the SC is drawn on (pipeline.sc_max_size default)


class NotProcessable(Exception):
    """The image cannot be given to the model; ``reason`` says why (stored with the study)."""

    def __init__(self, reason: str, skipped: list[tuple[str, str]] | None = None):
        self.reason = reason
        self.skipped = skipped or []  # (SOP Instance UID, reason) of each image, when a whole study was refused
        super().__init__(reason)


IDENTITY = (1, 0, 0, 1)


@dataclass(frozen=True)
class Transform:
    """Geometry from original (STORED) pixels to tensor pixels: reorientation, then ``t = o * scale + offset``.

    Coordinates are continuous with pixel *centres* at integer index + 0.5; the index-space helpers below
    convert, so ``to_original(*to_tensor(r, c)) == (r, c)``. ``orientation`` is the 2x2 integer matrix
    ``(a, b, c, d)`` (row-major; a signed permutation: a rotation by a multiple of 90 degrees and/or a flip)
    taking a stored (row, col) position, relative to the stored image's centre, to the reoriented image's
    (row, col) relative to its centre: ``o - centre_o = M (s - centre_s)``. ``scale`` and ``offset`` apply to
    the reoriented image, whose shape is ``original_shape`` with the axes swapped when ``M`` swaps them.
    Original indices are always those of the stored pixel grid (what the SR's SCOORDs and the SC use).
    """

    original_shape: tuple[int, int]  # (rows, columns) of the source image as stored
    target_shape: tuple[int, int]  # (height, width) of the tensor
    scale: tuple[float, float]  # tensor pixels per reoriented pixel, (row, col)
    offset: tuple[float, float]  # tensor pixels of padding before the content, (row, col)
    content_shape: tuple[int, int]  # (height, width) of the image content inside the tensor
    orientation: tuple[int, int, int, int] = IDENTITY  # stored -> reoriented, see the class docstring

    @property
    def transposed(self) -> bool:
        """Whether the reorientation swaps rows and columns (a 90 or 270 degree rotation, a transpose)."""
        return self.orientation[0] == 0

    @property
    def oriented_shape(self) -> tuple[int, int]:
        """(rows, columns) of the reoriented image (what ``scale`` and ``content_shape`` refer to)."""
        r, c = self.original_shape
        return (c, r) if self.transposed else (r, c)

    def _to_oriented(self, row: Any, col: Any) -> tuple[np.ndarray, np.ndarray]:
        a, b, c, d = self.orientation
        (sr, sc), (orr, occ) = self.original_shape, self.oriented_shape
        r = np.asarray(row, dtype=np.float64) + 0.5 - sr / 2.0
        k = np.asarray(col, dtype=np.float64) + 0.5 - sc / 2.0
        return a * r + b * k + orr / 2.0, c * r + d * k + occ / 2.0

    def _from_oriented(self, row: Any, col: Any) -> tuple[np.ndarray, np.ndarray]:
        a, b, c, d = self.orientation  # M is orthogonal: its inverse is its transpose
        (sr, sc), (orr, occ) = self.original_shape, self.oriented_shape
        r = np.asarray(row, dtype=np.float64) - orr / 2.0
        k = np.asarray(col, dtype=np.float64) - occ / 2.0
        return a * r + c * k + sr / 2.0 - 0.5, b * r + d * k + sc / 2.0 - 0.5

    def to_original(self, row: Any, col: Any) -> tuple[Any, Any]:
        """Tensor pixel index (float ok, arrays broadcast) -> stored pixel index (row, col)."""
        r = (np.asarray(row, dtype=np.float64) + 0.5 - self.offset[0]) / self.scale[0]
        c = (np.asarray(col, dtype=np.float64) + 0.5 - self.offset[1]) / self.scale[1]
        return self._from_oriented(r, c)

    def to_tensor(self, row: Any, col: Any) -> tuple[Any, Any]:
        """Stored pixel index (float ok, arrays broadcast) -> tensor pixel index (row, col)."""
        r, c = self._to_oriented(row, col)
        return r * self.scale[0] + self.offset[0] - 0.5, c * self.scale[1] + self.offset[1] - 0.5

    def stored_lines_to_tensor(self, rows: Any, cols: Any) -> tuple[np.ndarray, np.ndarray]:
        """The transform is axis-aligned: a stored row index alone decides one tensor coordinate, a stored
        column index the other. -> (tensor coordinate of each of ``rows``, of each of ``cols``): tensor ROW
        coordinates for ``rows`` and COLUMN coordinates for ``cols``, or the other way round when
        :attr:`transposed`. 1-D arrays in, 1-D arrays out (what a separable resampling of a heatmap needs)."""
        by_rows = self.to_tensor(np.asarray(rows, dtype=np.float64), 0.0)[1 if self.transposed else 0]
        by_cols = self.to_tensor(0.0, np.asarray(cols, dtype=np.float64))[0 if self.transposed else 1]
        return np.asarray(by_rows, dtype=np.float64), np.asarray(by_cols, dtype=np.float64)

    def heatmap_to_original(self, row: Any, col: Any, stride: int) -> tuple[Any, Any]:
        """Heatmap cell index (cell i covers tensor pixels [i*stride, (i+1)*stride)) -> original index."""
        tr = (np.asarray(row, dtype=np.float64) + 0.5) * stride - 0.5
        tc = (np.asarray(col, dtype=np.float64) + 0.5) * stride - 0.5
        return self.to_original(tr, tc)

    def as_dict(self) -> dict[str, Any]:
        return {
            "original_shape": list(self.original_shape),
            "target_shape": list(self.target_shape),
            "scale": list(self.scale),
            "offset": list(self.offset),
            "content_shape": list(self.content_shape),
            "orientation": list(self.orientation),
        }


@dataclass
class Prepared:
    """One image ready for the model, with what is needed to map outputs back and to draw on it."""

    tensor: np.ndarray  # (1, H, W) float32, normalised
    transform: Transform
    display: np.ndarray  # float32 in [0, 1], as a viewer shows it, long side <= DISPLAY_LONG_SIDE: the SC's image
    pixel_spacing: tuple[float, float] | None
    display_factor: float = 1.0  # original pixels per display pixel: display pixel d is on original pixel d * f


def check_header(ds: Dataset, max_pixels: int, min_size: int = 16) -> None:
    """Refuse what cannot or must not be decoded, from the header alone (before any decoding)."""
    if not any(t in ds for t in PIXEL_TAGS):
        raise NotProcessable("no pixel data in the image")
    if "PixelData" not in ds:
        raise NotProcessable("float pixel data is not supported (expected integer PixelData)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = int(ds.get("SamplesPerPixel", 1))
        bits = int(ds.BitsAllocated)
    except Exception as exc:  # absent, several values, not a number, or bytes pydicom cannot read as the VR
        raise NotProcessable(f"image header incomplete or invalid: {exc}") from exc
    if rows <= 0 or cols <= 0 or rows > MAX_DIM or cols > MAX_DIM or frames <= 0:
        raise NotProcessable(f"absurd image dimensions {rows}x{cols}x{frames}")
    if rows * cols * frames > max_pixels:
        raise NotProcessable(
            f"image too large: {rows}x{cols}x{frames} = {rows * cols * frames} pixels > limit {max_pixels}"
            " (refused before decoding)"
        )
    if rows < min_size or cols < min_size:
        raise NotProcessable(f"image too small: {rows}x{cols} (minimum {min_size}x{min_size})")
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if spp != 1 or pi not in MONO:
        raise NotProcessable(f"colour image ({pi or 'no photometric interpretation'}, {spp} samples/pixel)")
    if frames != 1:
        raise NotProcessable(f"multi-frame image ({frames} frames): the model takes single 2D images")
    if bits not in (8, 16, 32):
        raise NotProcessable(f"unsupported BitsAllocated {bits}")


def decode(ds: Dataset) -> np.ndarray:
    """Stored values of the (single-frame) image, any transfer syntax pydicom's plugins decode."""
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoders raise many types: all mean "cannot read these pixels"
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise NotProcessable(f"pixel data could not be decoded (transfer syntax {ts}): {exc}") from exc
    if arr.ndim != 2:
        raise NotProcessable(f"decoded pixel array has shape {arr.shape}, expected 2D")
    return stored_bits(ds, arr)


def stored_bits(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    """Only the Bits Stored (0028,0101) bits of each decoded pixel cell, sign-extended when Pixel Representation
    is 1: the unused high bits are ignored whatever they hold (PS3.5 8.1.1; High Bit = Bits Stored - 1).

    They may hold an overlay in the retired embedded form (Overlay Bits Allocated (60xx,0100) = Bits Allocated,
    Overlay Bit Position (60xx,0102) above High Bit, PS3.3 C.9.2.1.1), or a codestream's full precision: pydicom
    clears them for native, RLE and JPEG data but not for JPEG 2000 or JPEG-LS. Every image the pipeline makes
    from the pixels (the model input, the display image, hence the SC) starts from these values, so an overlay
    kept there is drawn nowhere. ``arr``: 2D integer array of the Bits Allocated width; returned masked (in place
    when writeable).
    """
    try:
        bits_stored = int(ds.BitsStored)
    except (AttributeError, TypeError, ValueError):
        return arr  # no Bits Stored: nothing says which bits are unused
    shift = arr.dtype.itemsize * 8 - bits_stored
    if arr.dtype.kind not in "iu" or shift <= 0 or bits_stored < 1:
        return arr
    if not arr.flags.writeable:
        arr = arr.copy()
    np.left_shift(arr, shift, out=arr)
    np.right_shift(arr, shift, out=arr)  # arithmetic on a signed dtype: sign-extends from High Bit
    return arr


# ---- the grayscale chain (PS3.3 C.11, PS3.4 N.2, PS3.14) -------------------------------------------------


def _little_endian(ds: Dataset) -> bool:
    """Byte order the dataset was read in (what OW LUT Data bytes are in); little endian unless it says big."""
    enc = getattr(ds, "original_encoding", (None, None))
    if enc[1] is not None:
        return bool(enc[1])
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return str(ts) != ExplicitVRBigEndian


def lut_table(item: Dataset, ds: Dataset) -> tuple[np.ndarray, int, int]:
    """One LUT of a Modality or VOI LUT Sequence item (PS3.3 C.11.1.1.1, C.11.2.1.1) -> (entries, first, bits).

    ``entries`` is an int64 array of the LUT Data, whatever their VR: US (a list), SS (the same 16 bits read
    signed: taken back as unsigned, LUT entries are unsigned), OW (bytes, in the byte order of ``ds``; how an
    implicit VR file stores it), and 8-bit entries packed two per word. ``first`` is the first input value
    mapped (signed when the descriptor is SS), ``bits`` the descriptor's third value, as written.
    Raises :class:`NotProcessable` for a descriptor without 3 values or empty data.
    """
    desc = item.get("LUTDescriptor")
    values = [desc] if isinstance(desc, int) else list(desc or [])
    if len(values) != 3 or "LUTData" not in item:
        raise NotProcessable(f"LUT with an invalid descriptor {values!r} or no LUT Data")
    n, first, bits = (int(v) for v in values)
    n = n or 65536  # PS3.3 C.11.1.1.1: 0 means 2**16 entries
    raw = item["LUTData"].value
    data: np.ndarray
    if isinstance(raw, (bytes, bytearray)):
        if bits <= 8 and len(raw) in (n, n + 1):  # 8-bit entries, one byte each (padded to even length)
            data = np.frombuffer(raw, dtype=np.uint8)[:n]
        else:
            data = np.frombuffer(raw, dtype="<u2" if _little_endian(ds) else ">u2", count=len(raw) // 2)
    else:
        data = np.asarray([raw] if isinstance(raw, int) else list(raw or []), dtype=np.int64) & 0xFFFF
        if bits <= 8 and n > 1 and data.size == (n + 1) // 2:  # 8-bit entries packed two per 16-bit word
            data = np.stack([data & 0xFF, data >> 8], axis=1).ravel()
    data = np.asarray(data, dtype=np.int64)[:n]
    if data.size == 0:
        raise NotProcessable("LUT with empty LUT Data")
    return data, first, bits


def _lut_index(values: np.ndarray, first: int, size: int) -> np.ndarray:
    """Input values -> LUT index: below the first mapped value -> entry 0, beyond the last -> the last."""
    if first >= 2**15 and float(values.max()) < 2**15:
        first -= 2**16  # a signed first value written as US (the inputs never reach it otherwise)
    idx = np.rint(values) if values.dtype.kind == "f" else values
    return np.clip(idx.astype(np.int64, copy=False) - first, 0, size - 1)


def lut_output_bits(data: np.ndarray, bits: int) -> int:
    """Bits the LUT output range has: those the data actually use (at least 8, at most 16), as DICOM
    renderers do (dcmtk ``--ignore-vlut-depth``): a descriptor saying 16 over data spanning 0..4095 means
    a 12-bit output, not a 16-bit one whose top sixteenth is used. All-zero data: the descriptor's value."""
    top = int(data.max())
    return min(16, max(8, top.bit_length())) if top > 0 else min(16, max(1, bits))


def modality_lut(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """PS3.3 C.11.1 Modality LUT: the Modality LUT Sequence if present, else Rescale Slope/Intercept
    -> float32 in modality output units (what windows and VOI LUTs are expressed in). Same values as
    pydicom's ``apply_modality_lut`` (compared in the tests), in float32 and for LUT Data in any VR."""
    if ds.get("ModalityLUTSequence"):
        data, first, _ = lut_table(ds.ModalityLUTSequence[0], ds)
        return data.astype(np.float32)[_lut_index(stored, first, data.size)]
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    values = stored.astype(np.float32)
    if slope != 1.0 or intercept != 0.0:
        values = values * np.float32(slope) + np.float32(intercept)
    return values


def voi_lut(item: Dataset, ds: Dataset, values: np.ndarray) -> np.ndarray:
    """PS3.3 C.11.2.1.1 VOI LUT (one VOI LUT Sequence item) -> float32 in [0, 1]: the LUT entry of each
    value (clamped to the LUT's range) over the top of the output range the data use (:func:`lut_output_bits`).
    Equals pydicom's ``apply_voi`` divided by that top where pydicom reads the LUT (compared in the tests)."""
    data, first, bits = lut_table(item, ds)
    top = 2 ** lut_output_bits(data, bits) - 1
    table = np.clip(data.astype(np.float32) * np.float32(1.0 / top), 0.0, 1.0)
    return table[_lut_index(values, first, data.size)]


def window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 (LINEAR) and C.11.2.1.3 (LINEAR_EXACT, SIGMOID) window -> float32 in [0, 1].

    LINEAR: ``((x - (c - 0.5)) / (w - 1) + 0.5)`` clamped (needs w >= 1); LINEAR_EXACT: ``(x - c) / w + 0.5``
    clamped (w > 0); SIGMOID: ``1 / (1 + exp(-4 (x - c) / w))`` (w > 0). The output range [ymin, ymax] of the
    standard is [0, 1] here. Raises ValueError for a non-finite center or width, a width the function does not
    allow, or an unknown function.
    """
    if not (math.isfinite(center) and math.isfinite(width)):
        raise ValueError(f"window center {center} / width {width} not finite")
    function = function.strip().upper() or "LINEAR"
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"SIGMOID window width {width} must be > 0")
        z = (values - np.float32(center)) * np.float32(-4.0 / width)
        return (1.0 / (1.0 + np.exp(np.minimum(z, 80.0, dtype=np.float32)))).astype(np.float32)
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"LINEAR_EXACT window width {width} must be > 0")
        lo, span = center - width / 2.0, width
    elif function == "LINEAR":
        if width < 1:
            raise ValueError(f"LINEAR window width {width} must be >= 1")
        lo, span = (center - 0.5) - (width - 1.0) / 2.0, max(width - 1.0, 1e-6)
    else:
        raise ValueError(f"unknown VOI LUT Function {function!r}")
    return np.clip((values - np.float32(lo)) * np.float32(1.0 / span), 0.0, 1.0, dtype=np.float32)


def _range(x: np.ndarray, keep: np.ndarray | None) -> tuple[float, float]:
    """(min, max) of ``x`` over the pixels ``keep`` marks (all when None; ``keep`` has at least one True)."""
    if keep is None:
        return float(x.min()), float(x.max())
    return float(np.min(x, where=keep, initial=np.inf)), float(np.max(x, where=keep, initial=-np.inf))


def _stretch(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((x - np.float32(lo)) * np.float32(1.0 / max(hi - lo, 1e-6)), 0.0, 1.0, dtype=np.float32)


def _first(value: Any) -> float:
    return float(value[0]) if isinstance(value, (MultiValue, list, tuple)) else float(value)


def _header_window(ds: Dataset, values: np.ndarray) -> np.ndarray | None:
    """The first (default) Window Center/Width with its VOI LUT Function, or None when absent or invalid."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = defined_term(ds.get("VOILUTFunction", "LINEAR"))
        return window(values, center, width, function if function in VOI_FUNCTIONS else "LINEAR")
    except (TypeError, ValueError, IndexError):
        return None


def voi(ds: Dataset, stored: np.ndarray, spec: Preprocessing, padding: np.ndarray | None = None) -> np.ndarray:
    """Modality LUT + VOI per the manifest's window policy -> float32 in [0, 1], before the presentation LUT.

    ``dicom``: the first VOI LUT Sequence item if present (PS3.3 C.11.2: a LUT is preferred over a window
    when both are given, as pydicom does), else the first Window Center/Width with its VOI LUT Function,
    else min-max; ``minmax``: the image's range; ``percentile``: the manifest's percentiles. ``padding``
    (bool, the image's shape; :func:`padding_mask`) marks pixels left out of every statistic (the min-max
    range, the percentiles); their output values are meaningless (the caller replaces them). Raises
    :class:`NotProcessable` when the modality LUT gives non-finite values (NaN or infinite Rescale
    Slope/Intercept, float32 overflow).
    """
    values = modality_lut(ds, stored)
    keep = None if padding is None else ~padding
    lo, hi = _range(values, keep)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN/inf Rescale Slope or Intercept, overflow to inf
        raise NotProcessable(
            "modality LUT gives non-finite values (Rescale Slope "
            f"{ds.get('RescaleSlope', 1)}, Intercept {ds.get('RescaleIntercept', 0)})"
        )
    if spec.window == "percentile":
        step = (slice(None, None, max(1, values.shape[0] // 512)), slice(None, None, max(1, values.shape[1] // 512)))
        sample = values[step] if keep is None else values[step][keep[step]]
        if sample.size == 0:  # every sampled pixel is padding (but not every pixel)
            sample = values[keep]
        plo, phi = np.percentile(sample, spec.percentiles)
        return _stretch(values, float(plo), float(phi))
    if spec.window == "dicom":
        if ds.get("VOILUTSequence"):
            return voi_lut(ds.VOILUTSequence[0], ds, values)
        windowed = _header_window(ds, values)
        if windowed is not None:
            return windowed
    return _stretch(values, lo, hi)


def presentation_inverts(ds: Dataset) -> bool:
    """Whether the display inverts the VOI output (minimum shown white): PS3.3 C.11.6 / C.8.11.1.1.

    Presentation LUT Shape (2050,0020), when IDENTITY or INVERSE, decides alone: its output is P-values
    (PS3.4 N.2), so INVERSE inverts once whatever the Photometric Interpretation (MONOCHROME1 + INVERSE,
    as DX and MG images are written, is one inversion, not two; MONOCHROME2 + INVERSE is inverted).
    Without it, MONOCHROME1 (C.7.6.3.1.2: minimum displayed white) inverts. This is what dcmtk renders
    (checked against ``dcm2pnm`` in the tests).
    """
    shape = defined_term(ds.get("PresentationLUTShape", ""))
    if shape in PRESENTATION_SHAPES:
        return shape == "INVERSE"
    return str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"


def grayscale(
    ds: Dataset, stored: np.ndarray, spec: Preprocessing, padding: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The whole grayscale chain on stored values -> (model image, view), both float32 in [0, 1].

    ``view`` is what a conformant viewer shows (bright = displayed bright): modality LUT -> VOI ->
    presentation. The model image is the view, or the VOI output before the presentation inversion when the
    manifest sets ``invert_monochrome1 = false``. Padding pixels (``padding``, :func:`padding_mask`) are left
    out of the VOI's statistics and set, after the presentation step, to the manifest's ``pad_value`` in the
    model image (the value of the letterbox around the image: what the model saw as "no body here, air" in
    training) and to 0 (black, as air is shown) in the view. Raises :class:`NotProcessable` for malformed
    LUTs/windows and non-finite values (a NaN or infinite Rescale Slope/Intercept, float32 overflow).
    """
    try:
        img = voi(ds, stored, spec, padding)
    except NotProcessable:
        raise
    except Exception as exc:  # malformed LUTs / windows
        raise NotProcessable(f"grayscale transform failed: {exc}") from exc
    view = np.subtract(np.float32(1.0), img, dtype=np.float32) if presentation_inverts(ds) else img
    model = view if spec.invert_monochrome1 else img
    if padding is not None:
        model = np.where(padding, np.float32(spec.pad_value), model).astype(np.float32, copy=False)
        view = np.where(padding, np.float32(0.0), view).astype(np.float32, copy=False)
    return model, view


# ---- Pixel Padding Value / Pixel Padding Range Limit (PS3.3 C.7.5.1.1.2) ---------------------------------


def _stored_int(value: Any, signed: bool) -> int:
    """A US or SS value (or its two raw bytes, little endian, where pydicom left an ambiguous VR unresolved) read
    as Pixel Representation says: a signed image's value written as US is taken back as two's complement, an
    unsigned image's value written as SS as the same 16 bits unsigned. Raises ValueError / TypeError."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0]
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 2:
            raise ValueError(f"{len(value)} bytes, 2 expected")
        value = int.from_bytes(value, "little", signed=signed)
    v = int(value)
    if signed and v >= 2**15:
        v -= 2**16
    elif not signed and v < 0:
        v += 2**16
    return v


def padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Pixels that are padding, not image (PS3.3 C.7.5.1.1.2) -> bool array of ``stored``'s shape, or None.

    Pixel Padding Value (0028,0120) alone marks that one stored value; with Pixel Padding Range Limit
    (0028,0121), every stored value between the two, inclusive, whichever is larger. Both are in stored-pixel
    units (before the Modality LUT) and their VR (US or SS) is that of Pixel Representation (0028,0103):
    compared with the decoded stored values (signed ones sign-extended from Bits Stored). None when the image
    declares no padding or has none. Raises :class:`NotProcessable` for a value that is not an integer, and when
    every pixel is padding (there is no image).
    """
    try:
        value = ds.get("PixelPaddingValue")
        if value is None or value == "" or (isinstance(value, (MultiValue, list)) and not value):
            return None
        signed = _stored_int(ds.get("PixelRepresentation", 0) or 0, False) == 1
        limit = ds.get("PixelPaddingRangeLimit")
        lo = hi = _stored_int(value, signed)
        if limit is not None and limit != "" and not (isinstance(limit, (MultiValue, list)) and not limit):
            other = _stored_int(limit, signed)
            lo, hi = min(lo, other), max(lo, other)
    except Exception as exc:  # TypeError, ValueError, or pydicom's own error for a value of the wrong length
        raise NotProcessable(f"Pixel Padding Value / Range Limit not a stored pixel value: {exc}") from exc
    if stored.dtype.kind in "iu":  # compare within the stored dtype's range (a value beyond it matches nothing)
        info = np.iinfo(stored.dtype)
        if hi < info.min or lo > info.max:
            return None
        lo, hi = max(lo, int(info.min)), min(hi, int(info.max))
    mask = stored == lo if lo == hi else (stored >= lo) & (stored <= hi)
    if not mask.any():
        return None
    if mask.all():
        span = f"{lo}" if lo == hi else f"{lo}..{hi}"
        raise NotProcessable(f"every pixel is padding (Pixel Padding Value {span}): no image to analyse")
    return mask


# ---- the display image the SC overlay is drawn on ---------------------------------------------------------


def display_factor(shape: tuple[int, int]) -> float:
    """Original pixels per display pixel: the display's long side is ``DISPLAY_LONG_SIDE`` (never enlarged).
    A power-of-two division, so exact in floating point."""
    return max(1.0, max(shape) / DISPLAY_LONG_SIDE)


def _centred_means_axis(x: np.ndarray, factor: float, axis: int) -> np.ndarray:
    """Means of ``x`` over intervals of ``factor`` pixels centred on original pixels 0, f, 2f, ... (``axis``
    0 or 1 of a 2D float32 array), with exact fractional coverage, clipped at the borders.

    Display sample d is then centred on original pixel index d * factor (what the SC renderer assumes). Done as
    a few weighted gathers of whole lines (one per pixel an interval touches: ceil(factor) + 1 at most).
    """
    n_in = x.shape[axis]
    n_out = int(np.floor((n_in - 1) / factor)) + 1
    centres = np.arange(n_out, dtype=np.float64) * factor + 0.5  # continuous coordinate of pixel centres
    lo = np.clip(centres - factor / 2.0, 0.0, float(n_in))
    hi = np.clip(centres + factor / 2.0, 0.0, float(n_in))
    start = np.floor(lo).astype(np.int64)
    shape = (-1, 1) if axis == 0 else (1, -1)
    out = np.zeros((n_out, x.shape[1]) if axis == 0 else (x.shape[0], n_out), dtype=np.float32)
    for j in range(int(np.ceil((hi - start).max()))):
        p = start + j  # the j-th pixel each interval touches: weight = its overlap / the interval's length
        w = np.clip(np.minimum(hi, p + 1) - np.maximum(lo, p), 0.0, None) / (hi - lo)
        out += w.astype(np.float32).reshape(shape) * np.take(x, np.minimum(p, n_in - 1), axis=axis)
    return out


def display_image(view: np.ndarray) -> tuple[np.ndarray, float]:
    """The view reduced to a long side of ``DISPLAY_LONG_SIDE`` (SC size; small in the prepared-image cache)
    -> (display, factor): display pixel d is centred on original pixel d * factor. A function of the decoded
    pixels only, so the same for every lossless encoding of them."""
    factor = display_factor(view.shape)
    if factor == 1.0:
        return view, 1.0
    return _centred_means_axis(_centred_means_axis(view, factor, 0), factor, 1), factor


# The pixel sizes (mm) taken from Pixel Spacing / Imager Pixel Spacing: far wider than any X-ray detector's
# (0.01-10 mm), narrow enough that no product of a size and a dimension overflows a float.
SPACING_RANGE_MM = (1e-6, 1e6)
_UNREADABLE = object()


def pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm from PixelSpacing or ImagerPixelSpacing, if sane."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(tag)
            if value is None:
                continue
            r, c = float(value[0]), float(value[1])
        except Exception:  # malformed (pydicom may raise anything for a value it cannot read): not a spacing
            continue
        # finite and within SPACING_RANGE_MM: an absurd magnitude (1e308, 1e-320) overflows the scale
        if all(SPACING_RANGE_MM[0] <= v <= SPACING_RANGE_MM[1] for v in (r, c)) and 0.01 < r / c < 100:
            return r, c
    return None


def pixel_aspect(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) size of a pixel, relative (what resampling to square pixels needs): Pixel Spacing /
    Imager Pixel Spacing (mm, :func:`pixel_spacing`) when present, else Pixel Aspect Ratio (0028,0034)
    (PS3.3 C.7.6.3.1.7: two integers, the vertical size then the horizontal size of a pixel: ``5\\4`` is a pixel
    5 units tall and 4 wide). None (square pixels) when neither is present. Raises :class:`NotProcessable` when
    Pixel Aspect Ratio is the only geometry given and it is not two positive integers (ratio within 1:100): the
    image's pixel shape is then unknown, and analysing it as square is the error the attribute exists to prevent."""
    spacing = pixel_spacing(ds)
    if spacing is not None:
        return spacing
    try:
        value = ds.get("PixelAspectRatio")  # an IS that is not an integer raises when read from a file
    except Exception:  # a value pydicom cannot read at all (wrong length for its VR)
        value = _UNREADABLE
    if value is None or value == "" or (isinstance(value, (MultiValue, list)) and not value):
        return None
    # Present, so the pixels are declared as they are: one the box cannot read is refused, never taken as square
    # (a non-square image analysed as square is what the attribute exists to prevent).
    try:
        if not isinstance(value, (MultiValue, list, tuple)) or len(value) != 2:
            raise ValueError("not 2 values")
        vertical, horizontal = (float(v) for v in value)
        if not (vertical.is_integer() and horizontal.is_integer()):
            raise ValueError("not integers")
    except (TypeError, ValueError, OverflowError) as exc:
        raise NotProcessable(
            f"Pixel Aspect Ratio not readable ({exc}): two integers expected (PS3.3 C.7.6.3.1.7)"
        ) from None
    if vertical > 0 and horizontal > 0 and 0.01 < vertical / horizontal < 100:
        return vertical, horizontal
    raise NotProcessable(
        f"Pixel Aspect Ratio {int(vertical)}\\{int(horizontal)} is not a pixel shape (two positive integers, ratio"
        " 1:100 to 100:1, PS3.3 C.7.6.3.1.7): the image's geometry is unknown"
    )


def plan_transform(
    shape: tuple[int, int],
    spacing: tuple[float, float] | None,
    spec: Preprocessing,
    orientation: tuple[int, int, int, int] = IDENTITY,
) -> Transform:
    """Scale per axis so output pixels are physically square and the image fits; centre the content.

    ``shape`` (rows, columns) and ``spacing`` (row, column pixel size, any unit: mm or :func:`pixel_aspect`'s
    ratio; None = square) are the STORED image's; ``orientation`` (:func:`orientation_matrix`) reorients it
    first, so the scale and content refer to the reoriented image (rows and columns swapped when transposed).
    """
    tf = Transform(shape, spec.target_size, (1.0, 1.0), (0.0, 0.0), spec.target_size, orientation)
    rows, cols = tf.oriented_shape
    if spacing is not None and tf.transposed:
        spacing = (spacing[1], spacing[0])
    th, tw = spec.target_size
    if not spec.keep_aspect:
        return Transform(shape, (th, tw), (th / rows, tw / cols), (0.0, 0.0), (th, tw), orientation)
    sr, sc = spacing if spacing else (1.0, 1.0)
    k = min(th / (rows * sr), tw / (cols * sc))  # tensor pixels per unit of length
    ch = min(th, max(1, round(rows * sr * k)))
    cw = min(tw, max(1, round(cols * sc * k)))
    off_r, off_c = (th - ch) // 2, (tw - cw) // 2
    # Exact per-axis scale of the rounded content: the content covers the whole original image.
    return Transform(shape, (th, tw), (ch / rows, cw / cols), (float(off_r), float(off_c)), (ch, cw), orientation)


# ---- Patient Orientation (PS3.3 C.7.6.1.1.1) ----------------------------------------------------------------

# Every signed 2x2 permutation matrix (row-major): the 4 rotations by 90 degrees and the 4 flips / transposes.
# The identity first: an image already in the model's orientation is never touched.
SIGNED_PERMUTATIONS: tuple[tuple[int, int, int, int], ...] = (
    IDENTITY,
    (-1, 0, 0, 1),
    (1, 0, 0, -1),
    (-1, 0, 0, -1),
    (0, 1, 1, 0),
    (0, -1, 1, 0),
    (0, 1, -1, 0),
    (0, -1, -1, 0),
)


def patient_orientation(ds: Dataset) -> list[str] | None:
    """Patient Orientation (0020,0020) values, upper case and trimmed; None when absent or zero length."""
    raw = ds.get("PatientOrientation")
    if raw is None:
        return None
    values = [str(v) for v in raw] if isinstance(raw, (MultiValue, list, tuple)) else str(raw).split("\\")
    values = [v.strip().upper() for v in values]
    return values if any(values) else None


def _target(ds: Dataset, spec: Preprocessing) -> Orientation:
    declared = spec.orientation or {}
    side = laterality_of(ds)
    target = declared.get(side) if side in ("L", "R") else None  # type: ignore[call-overload]
    target = target or declared.get("*")
    if target is None:
        raise NotProcessable(
            f"Patient Orientation: the model's orientation is declared for laterality {', '.join(sorted(declared))}"
            f" only; this image's laterality is {side or 'unknown'}"
        )
    return target


def orientation_matrix(ds: Dataset, spec: Preprocessing) -> tuple[int, int, int, int]:
    """The reorientation (:class:`Transform`'s ``orientation``) that brings the stored image to the orientation
    the model was trained on (the manifest's ``orientation``, for the image's laterality), from Patient
    Orientation (0020,0020) (PS3.3 C.7.6.1.1.1: the first value is the direction of the rows, i.e. of increasing
    column index, the second that of the columns, increasing row index; letters A/P, R/L, H/F, the principal one
    first, then up to two refinements for an oblique direction).

    Policy: no ``orientation`` in the manifest -> the identity (images as stored, as before the field). Patient
    Orientation absent or zero length (Type 2 in CR and DX, often left empty by CR plates) -> the identity: the
    image is taken as stored, as a viewer shows it (the box cannot know better). Anything else must resolve
    exactly, or the image is refused: :class:`NotProcessable` with a reason starting "Patient Orientation" for a
    count of values other than 2, an unknown letter or a quadruped Anatomical Orientation Type, a contradictory
    value (a letter repeated or with its opposite: ``AP``; both values on one axis: ``L\\R``), refinement letters
    (oblique) where the manifest does not allow them, no laterality entry in the manifest, or no rotation/flip
    reaching the model's orientation (e.g. a lateral view's ``A\\F`` for a model trained on ``L\\F``).
    """
    if spec.orientation is None:
        return IDENTITY
    values = patient_orientation(ds)
    if values is None:
        return IDENTITY
    shown = "\\".join(values)
    if defined_term(ds.get("AnatomicalOrientationType", "")) == "QUADRUPED":
        raise NotProcessable(f"Patient Orientation {shown} is in quadruped terms; the model takes biped images")
    if len(values) != 2:
        raise NotProcessable(f"Patient Orientation {shown} has {len(values)} values, 2 expected (PS3.3 C.7.6.1.1.1)")
    for v in values:
        if not v or len(v) > 3 or any(ch not in OPPOSITE_DIRECTION for ch in v):
            raise NotProcessable(f"Patient Orientation {shown}: {v!r} is not 1 to 3 of the letters A P R L H F")
        if len(set(v)) != len(v) or any(OPPOSITE_DIRECTION[ch] in v for ch in v):
            raise NotProcessable(f"Patient Orientation {shown} is contradictory ({v!r})")
    across, down = values[0][0], values[1][0]  # principal directions: increasing column index, increasing row
    if down in (across, OPPOSITE_DIRECTION[across]):
        raise NotProcessable(f"Patient Orientation {shown} is contradictory (both values on one axis)")
    target = _target(ds, spec)
    if not target.oblique and any(len(v) > 1 for v in values):
        raise NotProcessable(
            f"Patient Orientation {shown} is oblique; the model takes images whose rows and columns run along"
            " the patient's axes"
        )

    def toward(stored_axis: int, sign: int) -> str:
        letter = (down, across)[stored_axis]
        return letter if sign > 0 else OPPOSITE_DIRECTION[letter]

    for m in SIGNED_PERMUTATIONS:
        a, b, c, d = m  # reoriented axis 0 is stored axis 0 (a) or 1 (b), signed; axis 1 likewise (c, d)
        new_down = toward(0, a) if a else toward(1, b)
        new_across = toward(0, c) if c else toward(1, d)
        if new_down in target.columns and new_across in target.rows:
            return m
    raise NotProcessable(
        f"Patient Orientation {shown} cannot be brought by a rotation or flip to the model's orientation (rows toward"
        f" {'/'.join(target.rows)}, columns toward {'/'.join(target.columns)})"
    )


def reorient(img: np.ndarray, orientation: tuple[int, int, int, int]) -> np.ndarray:
    """The stored image (2-D, any dtype) reoriented by the signed permutation ``orientation`` (see
    :class:`Transform`): a transpose and/or flips, as a contiguous copy (the array itself for the identity)."""
    if orientation == IDENTITY:
        return img
    a, b, c, d = orientation
    if a == 0:  # transposed: reoriented row r is stored column r (b = -1: counted from the far side)
        img, flip_rows, flip_cols = img.T, b < 0, c < 0
    else:
        flip_rows, flip_cols = a < 0, d < 0
    return np.ascontiguousarray(img[:: -1 if flip_rows else 1, :: -1 if flip_cols else 1])


def _area_resample_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Box-filter resample along ``axis`` (0 or 1 of a 2D array) to ``n_out`` samples.

    Output sample k averages the input over the continuous interval [k, k+1) * n_in / n_out (exact
    fractional coverage). Downscaling sums whole input lines with ``np.add.reduceat`` and corrects the two
    fractional edge lines (float32); upscaling interpolates the cumulative sum (inputs are small then).
    """
    n_in = x.shape[axis]
    x = x.astype(np.float32, copy=False)
    if n_in == n_out:
        return x
    edges = np.linspace(0.0, n_in, n_out + 1)
    i0 = np.floor(edges).astype(np.int64)
    frac = (edges - i0).astype(np.float32)
    shape = (-1, 1) if axis == 0 else (1, -1)
    if n_out < n_in:
        pad = np.zeros((1, x.shape[1]) if axis == 0 else (x.shape[0], 1), dtype=np.float32)
        xp = np.concatenate([x, pad], axis=axis)
        out = np.add.reduceat(xp, i0[:-1], axis=axis)  # lines [i0_k, i0_{k+1})
        out -= frac[:-1].reshape(shape) * np.take(xp, i0[:-1], axis=axis)
        out += frac[1:].reshape(shape) * np.take(xp, i0[1:], axis=axis)
        out *= np.float32(n_out / n_in)
        return out
    zero = np.zeros((1, x.shape[1]) if axis == 0 else (x.shape[0], 1))
    csum = np.concatenate([zero, np.cumsum(x, axis=axis, dtype=np.float64)], axis=axis)
    j = np.clip(i0, 0, n_in - 1)
    at = np.take(csum, j, axis=axis) + (edges - j).reshape(shape) * np.take(x, j, axis=axis)
    diff = np.diff(at, axis=axis)
    return (diff * (n_out / n_in)).astype(np.float32)


def resample(img: np.ndarray, tf: Transform) -> np.ndarray:
    """Area-resample to the transform's content size (columns first: the contiguous axis is cheapest)."""
    ch, cw = tf.content_shape
    return _area_resample_axis(_area_resample_axis(img, cw, 1), ch, 0)


def fit(img: np.ndarray, tf: Transform, pad_value: float) -> np.ndarray:
    """Resample to the content size and pad (centred) to the target size."""
    th, tw = tf.target_shape
    out = np.full((th, tw), pad_value, dtype=np.float32)
    r0, c0 = int(tf.offset[0]), int(tf.offset[1])
    ch, cw = tf.content_shape
    out[r0 : r0 + ch, c0 : c0 + cw] = resample(img, tf)
    return out


def prepare(ds: Dataset, spec: Preprocessing, max_pixels: int, min_size: int = 16) -> Prepared:
    """The whole chain for one dataset -> :class:`Prepared` (tensor (1, H, W) float32, transform, display).

    The tensor is in the model's orientation (:func:`orientation_matrix`); the transform maps it back to the
    stored pixel grid; the display stays as stored (the SC shows the image as the PACS viewer does).
    Deterministic in the decoded stored values: any lossless encoding of the same pixels gives the same bytes.
    Raises :class:`NotProcessable` with the reason.
    """
    check_header(ds, max_pixels, min_size)
    spacing = pixel_spacing(ds)
    orientation = orientation_matrix(ds, spec)  # refused here, before decoding, when it cannot be resolved
    stored = decode(ds)
    img, view = grayscale(ds, stored, spec, padding_mask(ds, stored))
    tf = plan_transform(img.shape, pixel_aspect(ds), spec, orientation)
    tensor = fit(reorient(img, orientation), tf, spec.pad_value)
    if spec.mean != 0.0 or spec.std != 1.0:
        tensor = (tensor - np.float32(spec.mean)) * np.float32(1.0 / spec.std)
    display, factor = display_image(view)
    return Prepared(tensor=tensor[None], transform=tf, display=display, pixel_spacing=spacing, display_factor=factor)
