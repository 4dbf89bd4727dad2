"""The rest of the geometry and grayscale chain (issue 16, item 3), unit level: Patient Orientation (PS3.3
C.7.6.1.1.1) brought to the manifest's orientation with the Transform mapping back to the STORED grid, Pixel
Aspect Ratio (C.7.6.3.1.7), Pixel Padding Value / Pixel Padding Range Limit (C.7.5.1.1.2).

The expected Patient Orientation of each stored variant of an upright ``L\\F`` chest is written out by hand from
the standard's convention (first value: the direction of increasing column index; second: of increasing row
index), not computed by the code under test. With the REAL reference models: ``tests/test_geometry_reference.py``.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from appliance.pipeline.preprocess import (
    SIGNED_PERMUTATIONS,
    NotProcessable,
    orientation_matrix,
    padding_mask,
    pixel_aspect,
    plan_transform,
    prepare,
    voi,
)
from engines.manifest import Manifest, Orientation, Preprocessing, canonical_bytes
from testsupport.pipeline import make_dataset, synthetic_image

MAXPIX = 100_000_000
REFERENCE = Path(__file__).resolve().parents[1] / "engines" / "reference" / "bundles"
LEGACY = Path(__file__).parent / "data" / "legacy-bundles"  # signed before orientation existed
CHEST = {"*": Orientation(rows=["L"], columns=["F"])}
SPEC = Preprocessing(target_size=(96, 96), window="minmax", orientation=CHEST)

# How an upright chest (rows toward patient Left, columns toward Feet: L\F) is stored after each operation, and
# the Patient Orientation the standard gives the stored result (worked out by hand, C.7.6.1.1.1).
STORED_AS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], list[str]]] = {
    "upright": (lambda a: a, ["L", "F"]),
    "flipped left-right": (np.fliplr, ["R", "F"]),
    "flipped up-down": (np.flipud, ["L", "H"]),
    "rotated 180": (lambda a: np.rot90(a, 2), ["R", "H"]),
    "rotated 90 clockwise": (lambda a: np.rot90(a, -1), ["H", "L"]),
    "rotated 90 anticlockwise": (lambda a: np.rot90(a, 1), ["F", "R"]),
    "transposed": (lambda a: a.T, ["F", "L"]),
    "anti-transposed": (lambda a: np.rot90(a, 2).T, ["H", "R"]),
}


def _stored(upright: np.ndarray, how: str, spacing: tuple[float, float] = (0.2, 0.2)) -> Dataset:
    op, po = STORED_AS[how]
    ds = make_dataset(np.ascontiguousarray(op(upright)), spacing=spacing)
    ds.PatientOrientation = po
    return ds


def _upright_to_stored(how: str, shape: tuple[int, int], r: float, c: float) -> tuple[float, float]:
    """Where the upright pixel (r, c) sits in the stored image (by applying the operation to an index image)."""
    idx = np.arange(shape[0] * shape[1]).reshape(shape)
    hit = np.argwhere(STORED_AS[how][0](idx) == int(r) * shape[1] + int(c))[0]
    return float(hit[0]), float(hit[1])


@pytest.mark.parametrize("how", list(STORED_AS))
def test_every_stored_orientation_gives_the_upright_model_input_and_maps_back_to_the_stored_grid(how: str) -> None:
    """A bright dot at a known upright position: the tensor equals the upright image's exactly (a rotation or flip
    is exact), and the dot's tensor centroid maps back to where the dot is in the STORED image."""
    shape, dot = (140, 100), (37, 71)
    upright = synthetic_image(*shape, dot, radius=3.5, background=100, peak=4000)
    spacing = (0.2, 0.3)  # unequal spacing: swapped with the axes when the image is transposed
    want = prepare(_stored(upright, "upright", spacing), SPEC, MAXPIX)
    op, _ = STORED_AS[how]
    stored_spacing = spacing if op(np.zeros((2, 3))).shape == (2, 3) else spacing[::-1]
    got = prepare(_stored(upright, how, stored_spacing), SPEC, MAXPIX)
    np.testing.assert_array_equal(got.tensor, want.tensor)
    t = got.tensor[0] - got.tensor[0].min()
    rr, cc = np.mgrid[0 : t.shape[0], 0 : t.shape[1]]
    centroid = ((t * rr).sum() / t.sum(), (t * cc).sum() / t.sum())
    back = got.transform.to_original(*centroid)
    sr, sc = _upright_to_stored(how, shape, *dot)
    assert abs(float(back[0]) - sr) <= 1.0 and abs(float(back[1]) - sc) <= 1.0, (back, (sr, sc))
    assert got.transform.original_shape == op(upright).shape  # the stored grid
    assert got.display.shape == op(upright).shape  # the display (SC) stays as stored


@pytest.mark.parametrize("m", SIGNED_PERMUTATIONS)
def test_transform_round_trips_for_every_rotation_and_flip(m: tuple[int, int, int, int]) -> None:
    tf = plan_transform((517, 389), (0.1, 0.17), Preprocessing(target_size=(256, 200)), m)
    r, c = np.meshgrid(np.arange(0, 517, 7.5), np.arange(0, 389, 5.25), indexing="ij")
    back = tf.to_original(*tf.to_tensor(r, c))
    np.testing.assert_allclose(back[0], r, atol=1e-9)
    np.testing.assert_allclose(back[1], c, atol=1e-9)
    # the four stored corners land on the content's four corners (pixel centres half a pixel in)
    corners = tf.to_tensor(np.array([-0.5, -0.5, 516.5, 516.5]), np.array([-0.5, 388.5, -0.5, 388.5]))
    (h, w), (r0, c0) = tf.content_shape, tf.offset
    got = sorted(zip(np.round(corners[0] + 0.5, 9), np.round(corners[1] + 0.5, 9), strict=True))
    assert got == sorted([(r0, c0), (r0, c0 + w), (r0 + h, c0), (r0 + h, c0 + w)])


def test_no_orientation_in_the_manifest_or_in_the_image_means_as_stored() -> None:
    ds = _stored(synthetic_image(64, 48, (10, 10)), "rotated 90 clockwise")
    assert orientation_matrix(ds, Preprocessing(target_size=(32, 32))) == (1, 0, 0, 1)  # old bundles unchanged
    for empty in (None, ""):
        if empty is None:
            del ds.PatientOrientation
        else:
            ds.PatientOrientation = empty
        assert orientation_matrix(ds, SPEC) == (1, 0, 0, 1)  # CR Type 2, left empty: taken as stored


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (["A", "F"], "cannot be brought by a rotation or flip"),  # a lateral view for a PA-trained model
        (["L", "R"], "contradictory"),
        (["L", "L"], "contradictory"),
        (["AP", "F"], "contradictory"),
        (["LL", "F"], "contradictory"),
        (["AF", "L"], "oblique"),
        (["LH", "F"], "oblique"),
        (["L"], "has 1 values, 2 expected"),
        (["L", "F", "A"], "has 3 values"),
        (["X", "F"], "not 1 to 3 of the letters"),
        (["LHAP", "F"], "not 1 to 3 of the letters"),
    ],
)
def test_an_orientation_the_box_cannot_resolve_is_refused_with_its_reason(value: list[str], reason: str) -> None:
    ds = make_dataset(synthetic_image(64, 48, (10, 10)))
    ds.PatientOrientation = value
    with pytest.raises(NotProcessable, match=reason) as err:
        prepare(ds, SPEC, MAXPIX)
    assert err.value.reason.startswith("Patient Orientation")


def test_quadruped_orientation_is_refused() -> None:
    ds = make_dataset(synthetic_image(64, 48, (10, 10)))
    ds.AnatomicalOrientationType = "QUADRUPED"
    ds.PatientOrientation = ["L", "F"]
    with pytest.raises(NotProcessable, match="^Patient Orientation .*quadruped"):
        orientation_matrix(ds, SPEC)


MAMMO = {
    "L": Orientation(rows=["A"], columns=["F", "R"], oblique=True),
    "R": Orientation(rows=["P"], columns=["F", "L"], oblique=True),
}


@pytest.mark.parametrize(
    ("laterality", "value", "matrix"),
    [
        ("L", ["A", "R"], (1, 0, 0, 1)),  # L CC as displayed (PS3.3 C.8.11.7 practice): untouched
        ("L", ["A", "F"], (1, 0, 0, 1)),  # L MLO
        ("L", ["A", "FR"], (1, 0, 0, 1)),  # L MLO with its oblique refinement: the principal letters decide
        ("R", ["P", "L"], (1, 0, 0, 1)),  # R CC
        ("R", ["P", "F"], (1, 0, 0, 1)),  # R MLO
        ("L", ["P", "L"], (-1, 0, 0, -1)),  # L CC stored as an R CC would be: rotated 180
        ("R", ["A", "F"], (1, 0, 0, -1)),  # R MLO stored with the chest wall on the left: flipped left-right
        ("L", ["F", "A"], (0, 1, 1, 0)),  # L MLO stored transposed
    ],
)
def test_mammography_orientation_per_laterality(laterality: str, value: list[str], matrix: tuple) -> None:
    ds = make_dataset(synthetic_image(64, 48, (10, 10)), modality="MG", laterality=laterality, view="CC")
    ds.PatientOrientation = value
    assert orientation_matrix(ds, Preprocessing(target_size=(32, 32), orientation=MAMMO)) == matrix


def test_mammography_without_a_laterality_entry_is_refused() -> None:
    ds = make_dataset(synthetic_image(64, 48, (10, 10)), modality="MG", view="CC")
    ds.PatientOrientation = ["A", "R"]
    with pytest.raises(NotProcessable, match="^Patient Orientation: .*laterality L, R only.*unknown"):
        orientation_matrix(ds, Preprocessing(target_size=(32, 32), orientation=MAMMO))


@pytest.mark.parametrize(
    "bad",
    [
        {"*": {"rows": ["L", "R"], "columns": ["F"]}},  # a direction and its opposite
        {"*": {"rows": ["L"], "columns": ["R"]}},  # both on one axis
        {"*": {"rows": ["L"], "columns": ["F", "H"]}},
        {"*": {"rows": ["Q"], "columns": ["F"]}},
        {"B": {"rows": ["L"], "columns": ["F"]}},
        {},
    ],
)
def test_manifest_orientation_must_be_unambiguous(bad: dict) -> None:
    with pytest.raises(ValueError):
        Preprocessing(target_size=(32, 32), orientation=bad)


def test_manifest_without_orientation_keeps_its_canonical_bytes() -> None:
    """Old bundles verify unchanged: the field is left out of the signed bytes while unset; set, it is signed."""
    with tarfile.open(LEGACY / "cxr-phantom-1.0.1.bundle") as tar:
        raw = tar.extractfile("manifest.json").read()  # type: ignore[union-attr]
    doc = json.loads(raw)
    old = canonical_bytes(Manifest.model_validate(doc))
    assert b"orientation" not in old
    assert old == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    doc["inputs"][0]["preprocessing"]["orientation"] = {"*": {"rows": ["L"], "columns": ["F"]}}
    new = canonical_bytes(Manifest.model_validate(doc))
    assert b'"orientation":{"*":{"columns":["F"],"oblique":false,"rows":["L"]}}' in new


# ---- Pixel Aspect Ratio ------------------------------------------------------------------------------------


def test_pixel_aspect_ratio_is_used_where_pixel_spacing_is_absent() -> None:
    ds = make_dataset(synthetic_image(200, 150, (50, 50)), spacing=(0.1, 0.2))
    assert pixel_aspect(ds) == (0.1, 0.2)
    del ds.PixelSpacing, ds.ImagerPixelSpacing
    assert pixel_aspect(ds) is None
    ds.PixelAspectRatio = [1, 2]  # vertical \ horizontal: pixels twice as wide as tall
    assert pixel_aspect(ds) == (1.0, 2.0)
    tf = prepare(ds, Preprocessing(target_size=(128, 128), window="minmax"), MAXPIX).transform
    assert tf.content_shape == (85, 128)  # 200 x 150 pixels of 1 x 2 units = 200 x 300 units: 128 * 2 / 3
    for bad in ([0, 1], [1], [3, -2]):  # the only geometry given, unusable: refused, never taken as square
        ds.PixelAspectRatio = bad
        with pytest.raises(NotProcessable, match="Pixel Aspect Ratio"):
            pixel_aspect(ds)


# ---- Pixel Padding Value / Pixel Padding Range Limit ---------------------------------------------------------


def _padded(signed: bool) -> tuple[Dataset, np.ndarray]:
    rng = np.random.default_rng(3)
    body = rng.integers(1000, 3000, (40, 30))
    arr = body.astype(np.int16 if signed else np.uint16)
    ds = make_dataset(arr.astype(np.uint16) if not signed else arr.view(np.uint16))
    ds.PixelRepresentation = int(signed)
    ds.BitsStored, ds.HighBit = 16, 15
    return ds, arr


@pytest.mark.parametrize(
    ("signed", "value", "limit", "fill", "vr"),
    [
        (False, 65535, None, [65535], "US"),
        (False, 65535, 60000, [60000, 61234, 65535], "US"),  # the range, inclusive, whichever is larger
        (False, 60000, 65535, [60000, 65535], "US"),
        (True, -32768, None, [-32768], "SS"),
        (True, -30000, -32768, [-32768, -31000, -30000], "SS"),
        (True, 32768, None, [-32768], "US"),  # a signed image's value written as US: the same 16 bits
        (True, 0, None, [0], "SS"),
    ],
)
def test_padding_is_the_value_or_the_inclusive_range_in_stored_units(signed, value, limit, fill, vr) -> None:
    ds, arr = _padded(signed)
    want = np.zeros(arr.shape, bool)
    want[:, :5] = True
    arr[:, :5] = np.resize(np.array(fill), (arr.shape[0], 5))
    ds.PixelData = arr.tobytes()
    ds.add_new(0x00280120, vr, value)
    if limit is not None:
        ds.add_new(0x00280121, vr, limit)
    stored = ds.pixel_array
    np.testing.assert_array_equal(padding_mask(ds, stored), want)
    # just outside the range is image, not padding
    edge = (min(fill) - 1) if value == max(value, limit or value) or signed else max(fill) + 1
    if np.iinfo(arr.dtype).min <= edge <= np.iinfo(arr.dtype).max and edge not in fill:
        arr[0, 0] = edge
        ds.PixelData = arr.tobytes()
        assert not padding_mask(ds, ds.pixel_array)[0, 0]


def test_padding_is_left_out_of_every_statistic_and_set_to_the_background() -> None:
    ds, arr = _padded(False)
    arr[:, :5] = 65535
    ds.PixelData = arr.tobytes()
    ds.PixelPaddingValue = 65535
    stored = ds.pixel_array
    mask = padding_mask(ds, stored)
    assert mask is not None
    body = stored[~mask].astype(np.float64)
    for window in ("minmax", "percentile"):
        spec = Preprocessing(target_size=(32, 32), window=window, percentiles=(0.0, 100.0))
        out = voi(ds, stored, spec, mask)
        # the body spans [0, 1]: its own range, not one squeezed by 65535
        assert float(out[~mask].min()) == 0.0 and float(out[~mask].max()) == 1.0
        np.testing.assert_allclose(out[~mask], (body - body.min()) / (body.max() - body.min()), atol=1e-6)
    ds.PhotometricInterpretation = "MONOCHROME1"
    spec = Preprocessing(target_size=(40, 30), window="dicom", pad_value=0.25, keep_aspect=False)
    assert "WindowCenter" not in ds  # the fall-back window (min-max) too
    prep = prepare(ds, spec, MAXPIX)
    np.testing.assert_allclose(prep.tensor[0][:, :5], 0.25)  # the model's background
    np.testing.assert_allclose(prep.display[:, :5], 0.0)  # shown black, like air
    assert float(prep.tensor[0][:, 5:].min()) == 0.0 and float(prep.tensor[0][:, 5:].max()) == 1.0


def test_an_image_that_is_all_padding_is_refused() -> None:
    ds, arr = _padded(False)
    arr[:] = 7
    ds.PixelData = arr.tobytes()
    ds.PixelPaddingValue = 7
    with pytest.raises(NotProcessable, match="every pixel is padding"):
        prepare(ds, Preprocessing(target_size=(32, 32)), MAXPIX)
