"""Hostile and malformed header values at the intended-use gate, the geometry chain and the drift reference:
each is refused with its reason (a :class:`Refusal`, :class:`NotProcessable`, a manifest ValidationError),
never an exception that fails the study or a silent guess (attack3)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from appliance.pipeline import preprocess as pp
from appliance.pipeline.router import refusal_detail
from engines.manifest import Manifest, Reference, parse_manifest_bytes
from testsupport.pipeline import make_dataset, synthetic_image

BUNDLE = Path(__file__).resolve().parents[1] / "engines/reference/bundles/cxr-phantom-1.0.2.bundle"


@pytest.fixture(scope="module")
def cxr() -> Manifest:
    with tarfile.open(BUNDLE) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        return parse_manifest_bytes(member.read())


def _base(spacing: bool = True) -> Dataset:
    """A CR-class image the cxr 1.0.2 contract takes (adult, PA, For Presentation, 12 bits, 256x256)."""
    ds = make_dataset(synthetic_image(256, 256, (100, 100)))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    if not spacing:
        del ds.PixelSpacing
        del ds.ImagerPixelSpacing
    return ds


def _with_raw(ds: Dataset, tag: int, vr: str, value: bytes) -> Dataset:
    """``ds`` written to a Part-10 file (explicit VR little endian) with one element's value replaced by raw
    bytes (any length, odd ones included, as a hostile sender writes them), read back as the box reads files."""
    placeholder = b"\xa5\x5a" * 8
    ds[tag] = RawDataElement(Tag(tag), vr, len(placeholder), placeholder, 0, False, True)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    head = Tag(tag).group.to_bytes(2, "little") + Tag(tag).element.to_bytes(2, "little") + vr.encode()
    old = head + len(placeholder).to_bytes(2, "little") + placeholder
    data = buf.getvalue()
    assert data.count(old) == 1
    return dcmread(io.BytesIO(data.replace(old, head + len(value).to_bytes(2, "little") + value)))


def test_base_image_is_taken(cxr: Manifest) -> None:
    assert refusal_detail(cxr, _with_raw(_base(), 0x00280101, "US", (12).to_bytes(2, "little"))) is None


@pytest.mark.parametrize(
    ("tag", "vr", "value", "category"),
    [
        (0x00280101, "US", (12).to_bytes(2, "little") * 2, "bits"),  # Bits Stored with two values
        (0x00280101, "LO", b"12.5", "bits"),  # wrong VR, a fraction
        (0x00280101, "LO", b"abc ", "bits"),  # wrong VR, not a number
        (0x00280101, "US", b"\x0c", "bits"),  # one byte: pydicom cannot read it as US
        (0x00280010, "US", (256).to_bytes(2, "little") * 2, "size"),  # Rows with two values
        (0x00280011, "LO", b"abc ", "size"),  # Columns not a number
        (0x00280010, "US", b"\x00", "size"),
    ],
)
def test_malformed_integer_attributes_are_refused_not_raised(
    cxr: Manifest, tag: int, vr: str, value: bytes, category: str
) -> None:
    found = refusal_detail(cxr, _with_raw(_base(), tag, vr, value))
    assert found is not None and found.category == category
    assert "not readable" in found.reason


@pytest.mark.parametrize("spacing", [b"1e308\\1e308 ", b"1e-320\\1e-320", b"nan\\nan ", b"inf\\inf "])
def test_absurd_pixel_spacing_is_not_a_spacing(cxr: Manifest, spacing: bytes) -> None:
    """A Pixel Spacing that overflows the scale arithmetic is ignored like any malformed one: Imager Pixel
    Spacing (0.2 mm) gives the geometry, and the image is prepared, not failed."""
    ds = _with_raw(_base(), 0x00280030, "DS", spacing)
    prep = pp.prepare(ds, cxr.input.preprocessing, 50_000_000)
    assert prep.transform.content_shape == (256, 256)
    assert pp.pixel_spacing(ds) == (0.2, 0.2)


def test_absurd_spacing_alone_prepares_square(cxr: Manifest) -> None:
    ds = _with_raw(_base(spacing=False), 0x00280030, "DS", b"1e308\\1e308 ")
    assert pp.pixel_spacing(ds) is None
    assert pp.prepare(ds, cxr.input.preprocessing, 50_000_000).transform.content_shape == (256, 256)


@pytest.mark.parametrize("ratio", [b"0\\0 ", b"-1\\5 ", b"1\\999999999", b"5 ", b"5\\4\\3 ", b"abc\\1 ", b"1.5\\1 "])
def test_unreadable_pixel_aspect_ratio_is_refused_not_taken_as_square(cxr: Manifest, ratio: bytes) -> None:
    """PS3.3 C.7.6.3.1.7: with no Pixel Spacing, Pixel Aspect Ratio is the only statement of the pixel shape;
    one the box cannot use leaves the geometry unknown: refused with the reason, not analysed as square."""
    ds = _with_raw(_base(spacing=False), 0x00280034, "IS", ratio)
    with pytest.raises(pp.NotProcessable, match="Pixel Aspect Ratio"):
        pp.prepare(ds, cxr.input.preprocessing, 50_000_000)


def test_valid_pixel_aspect_ratio_still_applies(cxr: Manifest) -> None:
    ds = _with_raw(_base(spacing=False), 0x00280034, "IS", b"5\\4 ")
    assert pp.pixel_aspect(ds) == (5.0, 4.0)
    assert pp.prepare(ds, cxr.input.preprocessing, 50_000_000).transform.content_shape != (256, 256)


@pytest.mark.parametrize(
    ("tag", "vr", "value"),
    [
        (0x00280120, "US", b"\x00"),  # Pixel Padding Value of one byte
        (0x00280121, "US", b"\x00"),  # Pixel Padding Range Limit of one byte
        (0x00280103, "US", b"\x00\x00\x00\x00"),  # Pixel Representation with two values (read for padding)
    ],
)
def test_malformed_padding_attributes_are_not_processable(cxr: Manifest, tag: int, vr: str, value: bytes) -> None:
    ds = _base()
    ds.PixelPaddingValue = 0
    with pytest.raises(pp.NotProcessable):
        pp.prepare(_with_raw(ds, tag, vr, value), cxr.input.preprocessing, 50_000_000)


def test_one_byte_rows_is_not_processable(cxr: Manifest) -> None:
    with pytest.raises(pp.NotProcessable, match="header"):
        pp.prepare(_with_raw(_base(), 0x00280010, "US", b"\x01"), cxr.input.preprocessing, 50_000_000)


@pytest.mark.parametrize("field", ["input_mean", "study_score", "n"])
def test_reference_with_a_count_beyond_any_validation_set_is_refused(cxr: Manifest, field: str) -> None:
    """A signed reference holding a count of 10**400 would make every drift check raise OverflowError."""
    assert cxr.reference is not None
    doc = json.loads(cxr.reference.model_dump_json())
    doc[field] = 10**400 if field == "n" else [10**400] + doc[field][1:]
    with pytest.raises(ValidationError):
        Reference.model_validate(doc)
