"""DICOM image -> model input tensor, exactly as a bundle's ``Preprocessing`` says, plus the transform back.

Order (DICOM PS3.4 grayscale pipeline): decode -> modality LUT (rescale or LUT) -> VOI (window or VOI LUT
sequence, per the manifest's window policy) -> MONOCHROME1 inversion -> resample to square physical pixels
and fit into the target size (area averaging, vectorised) -> centred pad -> (x - mean) / std.

Every refusal (decompression bomb, colour image, 1x1, missing pixel data, undecodable) raises
:class:`NotProcessable` with a reason a person can act on; the geometry is recorded in a :class:`Transform`
so heatmap peaks and contours can be drawn on the original image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEG2000, JPEG2000Lossless

from engines.manifest import Preprocessing

MONO = ("MONOCHROME1", "MONOCHROME2")
MAX_DIM = 65535  # Rows/Columns are US: anything larger is a corrupt header
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class NotProcessable(Exception):
    """The image cannot be given to the model; ``reason`` says why (stored with the study)."""

    def __init__(self, reason: str):
        self.reason = reason
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
    display: np.ndarray  # float32 in [0, 1], bright = dense: the image the SC overlay is drawn on
    pixel_spacing: tuple[float, float] | None
    display_factor: int = 1  # original pixels per display pixel (J2K reduced-resolution decode)


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


def decode_reduced(ds: Dataset, min_rows: int, min_cols: int) -> tuple[np.ndarray, int] | None:
    """Decode a JPEG 2000 image at a lower resolution level, if that still gives >= (min_rows, min_cols).

    JPEG 2000 stores a wavelet pyramid: decoding level r skips the finest r levels (Pillow's ``reduce``),
    about 5-20x cheaper than a full decode, and yields a low-passed image whose sample j is centred on
    original pixel j * 2**r. Returns (stored values, 2**r), or None to decode in full.
    """
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if ts not in (JPEG2000Lossless, JPEG2000) or int(ds.get("PixelRepresentation", 0)) != 0:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    r = 0
    while r < 5 and -(-rows // 2 ** (r + 1)) >= min_rows and -(-cols // 2 ** (r + 1)) >= min_cols:
        r += 1
    if r == 0:
        return None
    try:
        from openjpeg import get_parameters
        from PIL import Image
        from pydicom.encaps import generate_frames

        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        params = get_parameters(frame)
    except Exception:  # anything unusual: the full decoder will either cope or say why
        return None
    if params["is_signed"] or params["samples_per_pixel"] != 1 or params["precision"] > 16:
        return None
    arr = None
    while r > 0:  # some level/size combinations fail in openjpeg ("broken data stream"): try a finer level
        try:
            with Image.open(io.BytesIO(frame)) as im:
                im.reduce = r
                im.load()
                arr = np.asarray(im)
            break
        except Exception:
            r -= 1
    if arr is None or arr.ndim != 2 or arr.shape != (-(-rows // 2**r), -(-cols // 2**r)):
        return None
    if arr.dtype == np.uint16 and params["precision"] < 16:
        arr = arr >> (16 - params["precision"])  # Pillow scales I;16 samples up to 16 bits
    return arr, 2**r


def _window_linear(x: np.ndarray, center: float, width: float, exact: bool) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window to [0, 1] (LINEAR uses the c-0.5 / w-1 convention)."""
    if exact:
        lo, span = center - width / 2.0, max(width, 1e-6)
    else:
        lo, span = (center - 0.5) - (width - 1.0) / 2.0, max(width - 1.0, 1e-6)
    return np.clip((x - np.float32(lo)) * np.float32(1.0 / span), 0.0, 1.0, dtype=np.float32)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return np.clip((x - np.float32(lo)) * np.float32(1.0 / max(hi - lo, 1e-6)), 0.0, 1.0, dtype=np.float32)


def _voi_lut(item: Dataset, values: np.ndarray) -> np.ndarray:
    """VOI LUT Sequence item (PS3.3 C.11.2.1.1): input clamped to the LUT's range, output scaled to [0, 1]."""
    n, first, bits = (int(v) for v in item.LUTDescriptor)
    n = n or 65536
    lut = np.asarray(item.LUTData, dtype=np.float32).ravel()[:n]
    if lut.size == 0:
        raise NotProcessable("empty VOI LUT")
    idx = np.clip(np.rint(values).astype(np.int64) - first, 0, lut.size - 1)
    top = max(float(2**bits - 1), float(lut.max()), 1.0)
    return lut[idx] * np.float32(1.0 / top)


def _first(value: Any) -> float:
    return float(value[0]) if isinstance(value, (MultiValue, list, tuple)) else float(value)


def voi(ds: Dataset, stored: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """Modality LUT + VOI per the manifest's window policy -> float32 in [0, 1] (before MONOCHROME1 inversion)."""
    if "ModalityLUTSequence" in ds:
        values = apply_modality_lut(stored, ds)
    else:  # rescale only: do it in float32 (pydicom would go to float64)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        values = stored.astype(np.float32)
        if slope != 1.0 or intercept != 0.0:
            values = values * np.float32(slope) + np.float32(intercept)
    values = np.asarray(values, dtype=np.float32)
    if spec.window == "percentile":
        sample = values[:: max(1, values.shape[0] // 512), :: max(1, values.shape[1] // 512)]
        lo, hi = np.percentile(sample, spec.percentiles)
        return np.clip((values - np.float32(lo)) / np.float32(max(hi - lo, 1e-6)), 0.0, 1.0, dtype=np.float32)
    if spec.window == "dicom":
        if "VOILUTSequence" in ds:
            return _voi_lut(ds.VOILUTSequence[0], values)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            try:
                center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
            except (TypeError, ValueError):
                center, width = None, None
            if center is not None and width is not None and width > 0:
                func = str(ds.get("VOILUTFunction", "LINEAR")).upper()
                if func == "SIGMOID":
                    return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
                return _window_linear(values, center, width, exact=func == "LINEAR_EXACT")
    return _minmax(values)


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
    """The whole chain for one dataset; raises NotProcessable with the reason."""
    check_header(ds, max_pixels, min_size)
    spacing = pixel_spacing(ds)
    full_tf = plan_transform((int(ds.Rows), int(ds.Columns)), spacing, spec)
    reduced = decode_reduced(ds, *full_tf.content_shape)
    stored, factor = reduced if reduced is not None else (decode(ds), 1)
    try:
        img = voi(ds, stored, spec)
    except NotProcessable:
        raise
    except Exception as exc:  # malformed LUTs / windows
        raise NotProcessable(f"grayscale transform failed: {exc}") from exc
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1" and spec.invert_monochrome1:
        img = np.subtract(np.float32(1.0), img, dtype=np.float32)
    tf = plan_transform(img.shape, spacing, spec)
    tensor = fit(img, tf, spec.pad_value)
    if spec.mean != 0.0 or spec.std != 1.0:
        tensor = (tensor - np.float32(spec.mean)) * np.float32(1.0 / spec.std)
    if factor != 1:
        # display pixel d is centred on original pixel d * factor (the wavelet low-pass is centred on even
        # samples; checked against a full decode in the tests): fold that into the original<->tensor map
        tf = Transform(
            original_shape=(int(ds.Rows), int(ds.Columns)),
            target_shape=tf.target_shape,
            scale=(tf.scale[0] / factor, tf.scale[1] / factor),
            offset=(
                tf.offset[0] + 0.5 * tf.scale[0] * (1 - 1 / factor),
                tf.offset[1] + 0.5 * tf.scale[1] * (1 - 1 / factor),
            ),
            content_shape=tf.content_shape,
        )
    return Prepared(tensor=tensor[None], transform=tf, display=img, pixel_spacing=spacing, display_factor=factor)
