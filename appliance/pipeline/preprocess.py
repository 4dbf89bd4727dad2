"""DICOM image -> model input tensor, exactly as a bundle's ``Preprocessing`` says, plus the transform back.

Order (the grayscale pipeline of PS3.3 C.11 / PS3.4 N.2 / PS3.14): decode (full resolution, any transfer
syntax: the same stored values for every lossless encoding) -> modality LUT (Modality LUT Sequence or rescale)
-> VOI (VOI LUT Sequence, window with its VOI LUT Function, per the manifest's window policy) -> presentation
(Presentation LUT Shape, else MONOCHROME1) -> resample to square physical pixels and fit into the target size
(area averaging, vectorised) -> centred pad -> (x - mean) / std. The SC overlay's display image is the same
view reduced to ``DISPLAY_LONG_SIDE``.

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

from appliance.pipeline.anatomy import defined_term
from engines.manifest import Preprocessing

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


@dataclass(frozen=True)
class Transform:
    """Geometry from original pixels to tensor pixels: ``t = o * scale + offset`` per axis.

    Coordinates are continuous with pixel *centres* at integer index + 0.5; the index-space helpers below
    convert, so ``to_original(*to_tensor(r, c)) == (r, c)``.
    """

    original_shape: tuple[int, int]  # (rows, columns) of the source image
    target_shape: tuple[int, int]  # (height, width) of the tensor
    scale: tuple[float, float]  # tensor pixels per original pixel, (row, col)
    offset: tuple[float, float]  # tensor pixels of padding before the content, (row, col)
    content_shape: tuple[int, int]  # (height, width) of the image content inside the tensor

    def to_original(self, row: Any, col: Any) -> tuple[Any, Any]:
        """Tensor pixel index (float ok) -> original pixel index (row, col)."""
        r = (np.asarray(row, dtype=np.float64) + 0.5 - self.offset[0]) / self.scale[0] - 0.5
        c = (np.asarray(col, dtype=np.float64) + 0.5 - self.offset[1]) / self.scale[1] - 0.5
        return r, c

    def to_tensor(self, row: Any, col: Any) -> tuple[Any, Any]:
        """Original pixel index -> tensor pixel index."""
        r = (np.asarray(row, dtype=np.float64) + 0.5) * self.scale[0] + self.offset[0] - 0.5
        c = (np.asarray(col, dtype=np.float64) + 0.5) * self.scale[1] + self.offset[1] - 0.5
        return r, c

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
    except (AttributeError, TypeError, ValueError) as exc:
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


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
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


def voi(ds: Dataset, stored: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """Modality LUT + VOI per the manifest's window policy -> float32 in [0, 1], before the presentation LUT.

    ``dicom``: the first VOI LUT Sequence item if present (PS3.3 C.11.2: a LUT is preferred over a window
    when both are given, as pydicom does), else the first Window Center/Width with its VOI LUT Function,
    else min-max; ``minmax``: the image's range; ``percentile``: the manifest's percentiles. Raises
    :class:`NotProcessable` when the modality LUT gives non-finite values (NaN or infinite Rescale
    Slope/Intercept, float32 overflow).
    """
    values = modality_lut(ds, stored)
    lo, hi = float(values.min()), float(values.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN/inf Rescale Slope or Intercept, overflow to inf
        raise NotProcessable(
            "modality LUT gives non-finite values (Rescale Slope "
            f"{ds.get('RescaleSlope', 1)}, Intercept {ds.get('RescaleIntercept', 0)})"
        )
    if spec.window == "percentile":
        sample = values[:: max(1, values.shape[0] // 512), :: max(1, values.shape[1] // 512)]
        lo, hi = np.percentile(sample, spec.percentiles)
        return np.clip((values - np.float32(lo)) / np.float32(max(hi - lo, 1e-6)), 0.0, 1.0, dtype=np.float32)
    if spec.window == "dicom":
        if ds.get("VOILUTSequence"):
            return voi_lut(ds.VOILUTSequence[0], ds, values)
        windowed = _header_window(ds, values)
        if windowed is not None:
            return windowed
    return _minmax(values)


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


def grayscale(ds: Dataset, stored: np.ndarray, spec: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """The whole grayscale chain on stored values -> (model image, view), both float32 in [0, 1].

    ``view`` is what a conformant viewer shows (bright = displayed bright): modality LUT -> VOI ->
    presentation. The model image is the view, or the VOI output before the presentation inversion when the
    manifest sets ``invert_monochrome1 = false``. Raises :class:`NotProcessable` for malformed LUTs/windows
    and non-finite values (a NaN or infinite Rescale Slope/Intercept, float32 overflow).
    """
    try:
        img = voi(ds, stored, spec)
    except NotProcessable:
        raise
    except Exception as exc:  # malformed LUTs / windows
        raise NotProcessable(f"grayscale transform failed: {exc}") from exc
    view = np.subtract(np.float32(1.0), img, dtype=np.float32) if presentation_inverts(ds) else img
    return (view if spec.invert_monochrome1 else img), view


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


def pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm from PixelSpacing or ImagerPixelSpacing, if sane."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(tag)
        if value is not None:
            try:
                r, c = float(value[0]), float(value[1])
            except (TypeError, ValueError, IndexError):
                continue
            if r > 0 and c > 0 and 0.01 < r / c < 100:
                return r, c
    return None


def plan_transform(shape: tuple[int, int], spacing: tuple[float, float] | None, spec: Preprocessing) -> Transform:
    """Scale per axis so output pixels are physically square and the image fits; centre the content."""
    rows, cols = shape
    th, tw = spec.target_size
    if not spec.keep_aspect:
        return Transform(shape, (th, tw), (th / rows, tw / cols), (0.0, 0.0), (th, tw))
    sr, sc = spacing if spacing else (1.0, 1.0)
    k = min(th / (rows * sr), tw / (cols * sc))  # tensor pixels per mm
    ch = min(th, max(1, round(rows * sr * k)))
    cw = min(tw, max(1, round(cols * sc * k)))
    off_r, off_c = (th - ch) // 2, (tw - cw) // 2
    # Exact per-axis scale of the rounded content: the content covers the whole original image.
    return Transform(shape, (th, tw), (ch / rows, cw / cols), (float(off_r), float(off_c)), (ch, cw))


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

    Deterministic in the decoded stored values: any lossless encoding of the same pixels gives the same bytes.
    Raises :class:`NotProcessable` with the reason.
    """
    check_header(ds, max_pixels, min_size)
    spacing = pixel_spacing(ds)
    stored = decode(ds)
    img, view = grayscale(ds, stored, spec)
    tf = plan_transform(img.shape, spacing, spec)
    tensor = fit(img, tf, spec.pad_value)
    if spec.mean != 0.0 or spec.std != 1.0:
        tensor = (tensor - np.float32(spec.mean)) * np.float32(1.0 / spec.std)
    display, factor = display_image(view)
    return Prepared(tensor=tensor[None], transform=tf, display=display, pixel_spacing=spacing, display_factor=factor)
