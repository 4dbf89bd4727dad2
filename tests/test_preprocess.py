"""Preprocessing: decoding every transfer syntax, grayscale pipeline, refusals, and exact geometry."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, RLELossless

from appliance.pipeline.preprocess import NotProcessable, Transform, plan_transform, prepare
from engines.manifest import Preprocessing
from testsupport.pipeline import make_dataset, synthetic_image

SPEC = Preprocessing(target_size=(64, 64), window="minmax")
MAXPIX = 100_000_000


def _testfile(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name, download=False))


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_every_transfer_syntax_decodes_to_the_same_tensor(name: str) -> None:
    ref = prepare(_testfile("MR_small.dcm"), SPEC, MAXPIX)
    got = prepare(_testfile(name), SPEC, MAXPIX)
    assert got.tensor.shape == (1, 64, 64)
    np.testing.assert_allclose(got.tensor, ref.tensor, atol=1e-5)


@pytest.mark.parametrize("name", ["693_J2KI.dcm", "JPEG2000.dcm"])
def test_lossy_and_j2k_inputs_decode(name: str) -> None:
    ds = _testfile(name)
    prep = prepare(ds, Preprocessing(target_size=(64, 64)), MAXPIX)
    assert prep.tensor.shape == (1, 64, 64)
    assert np.isfinite(prep.tensor).all() and prep.tensor.max() > 0.1
    assert prep.display.shape == (ds.Rows, ds.Columns)


def test_undecodable_transfer_syntax_is_not_processable_with_reason() -> None:
    """12-bit JPEG Extended needs libjpeg (GPL, not shipped): a clear reason, not a crash."""
    with pytest.raises(NotProcessable, match="could not be decoded.*1.2.840.10008.1.2.4.51"):
        prepare(_testfile("JPGExtended.dcm"), SPEC, MAXPIX)


def test_monochrome1_is_inverted_so_bright_means_dense() -> None:
    ds = _testfile("6154")  # CR, MONOCHROME1, window + rescale
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    inverted = prepare(ds, Preprocessing(target_size=(16, 16)), MAXPIX)
    kept = prepare(ds, Preprocessing(target_size=(16, 16), invert_monochrome1=False), MAXPIX)
    np.testing.assert_allclose(inverted.tensor, 1.0 - kept.tensor, atol=1e-6)


def test_window_from_header_matches_dicom_linear_formula() -> None:
    ds = _testfile("MR_small.dcm")
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    prep = prepare(ds, Preprocessing(target_size=(64, 64), window="dicom"), MAXPIX)
    raw = ds.pixel_array.astype(np.float64)
    expected = np.clip((raw - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(prep.display, expected, atol=1e-5)


def test_voi_lut_sequence_is_applied() -> None:
    ds = _testfile("MR_small.dcm")
    del ds.WindowCenter
    del ds.WindowWidth
    item = Dataset()
    # LUT: first mapped value 0, 256 entries, 8-bit output; output = 255 - index (an inverting LUT)
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = list(range(255, -1, -1))
    ds.VOILUTSequence = [item]
    prep = prepare(ds, Preprocessing(target_size=(64, 64), window="dicom"), MAXPIX)
    raw = ds.pixel_array.astype(np.int64)
    expected = (255 - np.clip(raw, 0, 255)) / 255.0
    np.testing.assert_allclose(prep.display, expected, atol=1e-5)


def test_rescale_slope_intercept_applied_before_window() -> None:
    base = synthetic_image(64, 64, None) + 1000
    base[:, 32:] += 40  # a second level, so the image has contrast
    ds = make_dataset(base.astype(np.uint16), window=(100.0, 200.0))  # window in rescaled units
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -450  # 1200 stored -> 150 rescaled, 1240 -> 170
    prep = prepare(ds, Preprocessing(target_size=(64, 64), window="dicom"), MAXPIX)
    np.testing.assert_allclose(prep.display[:, :32], np.clip((150 - 99.5) / 199 + 0.5, 0, 1), atol=1e-5)
    np.testing.assert_allclose(prep.display[:, 32:], np.clip((170 - 99.5) / 199 + 0.5, 0, 1), atol=1e-5)


def test_percentile_window() -> None:
    ds = make_dataset(np.arange(100 * 100, dtype=np.uint16).reshape(100, 100) % 4000)
    prep = prepare(ds, Preprocessing(target_size=(32, 32), window="percentile", percentiles=(10, 90)), MAXPIX)
    assert (prep.display == 0).mean() > 0.05 and (prep.display == 1).mean() > 0.05


# ---- refusals ------------------------------------------------------------------------------------------


def test_rgb_image_is_not_processable() -> None:
    with pytest.raises(NotProcessable, match="colour image"):
        prepare(_testfile("SC_rgb_rle.dcm"), SPEC, MAXPIX)


def test_one_by_one_image_is_not_processable() -> None:
    ds = make_dataset(np.array([[7]], dtype=np.uint16))
    with pytest.raises(NotProcessable, match="too small"):
        prepare(ds, SPEC, MAXPIX)


def test_missing_pixel_data_is_not_processable() -> None:
    ds = _testfile("MR_small.dcm")
    del ds.PixelData
    with pytest.raises(NotProcessable, match="no pixel data"):
        prepare(ds, SPEC, MAXPIX)


def test_decompression_bomb_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_dataset(synthetic_image(32, 32, None), transfer_syntax=JPEG2000Lossless)
    ds.Rows, ds.Columns = 60000, 60000  # declared far beyond the limit; the codestream is tiny
    called = []
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda self: called.append(1)))
    with pytest.raises(NotProcessable, match="refused before decoding"):
        prepare(ds, SPEC, max_pixels=50_000_000)
    assert called == []


def test_corrupt_compressed_pixels_are_not_processable() -> None:
    ds = make_dataset(synthetic_image(64, 64, (30, 30)), transfer_syntax=RLELossless)
    ds.PixelData = ds.PixelData[:40]  # truncated fragment
    with pytest.raises(NotProcessable, match="could not be decoded"):
        prepare(ds, SPEC, MAXPIX)


def test_multiframe_is_not_processable() -> None:
    ds = _testfile("rtdose.dcm")
    with pytest.raises(NotProcessable):
        prepare(ds, SPEC, MAXPIX)


# ---- geometry ------------------------------------------------------------------------------------------


def test_transform_round_trip_and_non_square_spacing() -> None:
    spec = Preprocessing(target_size=(256, 256))
    # 2000 x 1000 pixels, but row spacing 0.1 mm and col spacing 0.2 mm: physically square (200 x 200 mm)
    tf = plan_transform((2000, 1000), (0.1, 0.2), spec)
    assert tf.content_shape == (256, 256)
    assert tf.scale[0] * 2 == pytest.approx(tf.scale[1])
    r, c = tf.to_original(*tf.to_tensor(1234.0, 567.0))
    assert (float(r), float(c)) == pytest.approx((1234.0, 567.0))
    # same pixels, square spacing: content is 256 x 128, centred with 64 columns of padding each side
    tf2 = plan_transform((2000, 1000), (0.2, 0.2), spec)
    assert tf2.content_shape == (256, 128) and tf2.offset == (0.0, 64.0)


@pytest.mark.parametrize(
    ("shape", "spacing", "dot"),
    [((700, 500), (0.2, 0.2), (123, 401)), ((600, 900), (0.3, 0.15), (450, 150)), ((333, 333), None, (60, 250))],
)
def test_bright_dot_maps_back_within_a_pixel(shape, spacing, dot) -> None:
    """A dot placed in the original lands in the tensor where to_tensor says, and maps back to itself."""
    spec = Preprocessing(target_size=(128, 128), window="minmax")
    # a Gaussian dot about 3 tensor pixels wide (a dot smaller than one tensor pixel cannot be localised)
    sigma = 3.0 * max(shape) / 128
    img = synthetic_image(shape[0], shape[1], dot, radius=sigma, background=0, peak=4000)
    ds = make_dataset(img, spacing=spacing or (0.2, 0.2))
    if spacing is None:
        del ds.PixelSpacing
        del ds.ImagerPixelSpacing
    prep = prepare(ds, spec, MAXPIX)
    t = prep.tensor[0]
    rr, cc = np.mgrid[0 : t.shape[0], 0 : t.shape[1]]
    w = t - t.min()
    centroid = ((w * rr).sum() / w.sum(), (w * cc).sum() / w.sum())
    back = prep.transform.to_original(*centroid)
    assert abs(float(back[0]) - dot[0]) <= 1.0
    assert abs(float(back[1]) - dot[1]) <= 1.0


def test_area_resample_preserves_mean() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4000, (517, 389)).astype(np.uint16)
    prep = prepare(
        make_dataset(img, spacing=(0.2, 0.2)),
        Preprocessing(target_size=(97, 97), window="minmax", keep_aspect=False),
        MAXPIX,
    )
    assert prep.tensor.mean() == pytest.approx(prep.display.mean(), rel=1e-4)


def test_transform_is_plain_data() -> None:
    tf = Transform((10, 20), (8, 8), (0.4, 0.4), (2.0, 0.0), (4, 8))
    assert tf.as_dict()["offset"] == [2.0, 0.0]
    assert copy.deepcopy(tf) == tf


def test_big_j2k_image_is_decoded_in_full_and_display_keeps_geometry() -> None:
    """A big J2K lossless image gives the same model input as uncompressed (no reduced-resolution decode);
    the display is reduced to DISPLAY_LONG_SIDE with display pixel d centred on original pixel d * factor."""
    spec = Preprocessing(target_size=(128, 128), window="minmax")
    dot = (700.0, 333.0)
    img = synthetic_image(1200, 1000, dot, radius=40, background=300, peak=3000)
    full = prepare(make_dataset(img), spec, MAXPIX)
    j2k = prepare(make_dataset(img, transfer_syntax=JPEG2000Lossless), spec, MAXPIX)
    assert j2k.tensor.tobytes() == full.tensor.tobytes() and j2k.display.tobytes() == full.display.tobytes()
    assert j2k.transform == full.transform and j2k.display_factor == full.display_factor == 1200 / 1024
    assert max(full.display.shape) == 1024
    d = full.display
    rr, cc = np.mgrid[0 : d.shape[0], 0 : d.shape[1]]
    w = np.clip(d - 0.2, 0, None)
    centroid = ((w * rr).sum() / w.sum() * full.display_factor, (w * cc).sum() / w.sum() * full.display_factor)
    assert abs(centroid[0] - dot[0]) <= 1.0 and abs(centroid[1] - dot[1]) <= 1.0
    t = full.tensor[0]
    rr, cc = np.mgrid[0 : t.shape[0], 0 : t.shape[1]]
    w = np.clip(t - 0.2, 0, None)
    back = full.transform.to_original((w * rr).sum() / w.sum(), (w * cc).sum() / w.sum())
    assert abs(float(back[0]) - dot[0]) <= 2.0 and abs(float(back[1]) - dot[1]) <= 2.0


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"RescaleSlope": "NaN"}, "non-finite"),
        ({"RescaleSlope": "inf"}, "non-finite"),
        ({"RescaleIntercept": "1e300"}, "non-finite"),  # overflows float32
        ({"WindowCenter": "NaN", "WindowWidth": "400"}, None),  # invalid window: the image's own range instead
    ],
)
def test_non_finite_or_contrastless_grayscale_is_refused_with_a_reason(attrs: dict, reason: str | None) -> None:
    """Hostile or broken rescale/window values never reach the model as NaN or as a blank image."""
    base = synthetic_image(64, 64, None) + 1000
    base[:, 32:] += 400
    ds = make_dataset(base.astype(np.uint16), window=(1200.0, 800.0))
    for k, v in attrs.items():
        setattr(ds, k, v)
    spec = Preprocessing(target_size=(64, 64), window="dicom")
    if reason is None:
        prep = prepare(ds, spec, MAXPIX)
        assert np.isfinite(prep.tensor).all() and np.ptp(prep.display) > 0.5
    else:
        with pytest.raises(NotProcessable, match=reason):
            prepare(ds, spec, MAXPIX)
