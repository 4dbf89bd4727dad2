"""Read the few identifying fields of a received instance, and decide whether it can be filed at all.

Malformed-input policy (one rule, applied to every C-STORE): an instance is *refused* with a DIMSE
failure status only when the box cannot file it correctly — its data set does not parse, an element
is truncated, the Study or SOP Instance UID is missing, a Study, Series or SOP Instance UID is not a
valid UID (PS3.5 9.1, with the UI padding of PS3.5 6.2: these values become identifiers, keys and
references in the results), or the data set contradicts the C-STORE command (SOP class / instance
UID). Everything else is stored byte-for-byte and recorded, with any oddity noted in
``instances.flags`` (e.g. ``no_series_uid``); whether the models can use it is the pipeline's
decision, not the receiver's. Nothing is ever acknowledged and then dropped.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from appliance.core.safe_names import unpadded_uid

# Failure statuses (PS3.4 C-STORE): 0xC000-0xCFFF "cannot understand", 0xA900 "does not match SOP class".
STATUS_UNREADABLE = 0xC210
STATUS_MISSING_UID = 0xC211
STATUS_UID_MISMATCH = 0xC212
STATUS_CLASS_MISMATCH = 0xA900
STATUS_ENCODING_MISMATCH = 0xC213  # "cannot understand": not encoded in the negotiated transfer syntax
# A Study/Series/SOP Instance UID that is not a valid UID: "cannot understand" (PS3.4 Table B.2-1, Cxxx), the
# family of 0xC211 (UID missing): the box cannot use the value as the identifier it must be. Not 0xA900 "Data Set
# does not match SOP Class": that one is kept for the data set contradicting the command's SOP class, and a
# modality reads both as a failure not worth retrying unchanged.
STATUS_INVALID_UID = 0xC214

UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
PREFIX_GIVE_UP = 1 << 20  # no Pixel Data in the first MiB: parse the whole data set at the end
# Error Comment (LO, at most 64 characters) sent back with each failure status; the log has the detail.
COMMENTS = {
    STATUS_UNREADABLE: "data set does not parse or an element is truncated",
    STATUS_MISSING_UID: "Study or SOP Instance UID missing",
    STATUS_UID_MISMATCH: "SOP Instance UID differs from the C-STORE command",
    STATUS_CLASS_MISMATCH: "SOP Class UID differs from the C-STORE command",
    STATUS_ENCODING_MISMATCH: "data set not encoded in the negotiated transfer syntax",
    STATUS_INVALID_UID: "Study, Series or SOP Instance UID not a valid UID (PS3.5 9.1)",
}


class MalformedInstance(Exception):
    """The instance cannot be filed; ``status`` is the DIMSE failure status to answer."""

    def __init__(self, status: int, reason: str):
        self.status = status
        self.reason = reason
        self.comment = COMMENTS.get(status, "instance refused")
        super().__init__(f"0x{status:04X}: {reason}")


@dataclass(frozen=True)
class InstanceHeader:
    study_uid: str
    series_uid: str | None
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None
    flags: tuple[str, ...] = field(default=())
    # what the worklist shows (PS3.3 C.7.1.1 / C.7.2.1), decoded; None when absent or empty
    patient_name: str | None = None  # PN, components separated by "^" as in the data set
    patient_id: str | None = None
    accession_number: str | None = None
    study_date: str | None = None  # DA as received (YYYYMMDD), not validated


# The identifying attributes, read from the raw element bytes: UI and CS values use the default
# repertoire, so no character set, value conversion or validation is needed (pydicom's conversion
# was most of the header's cost on the receive path).
STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS, MODALITY = 0x0020000D, 0x0020000E, 0x00080018, 0x00080016, 0x00080060
# Patient and study attributes for people (worklist): text in the data set's Specific Character Set
CHARSET, PATIENT_NAME, PATIENT_ID, ACCESSION, STUDY_DATE = 0x00080005, 0x00100010, 0x00100020, 0x00080050, 0x00080020
_PN_DELIMITERS = {0x5E, 0x3D}  # "^" and "=" (PS3.5 6.2.1: component and component-group delimiters)
_TEXT_DELIMITERS = {0x5C}  # "\\" (value multiplicity)
DEMOGRAPHIC_MAX = 200  # characters kept of each


def _decoded(ds: Dataset, tag: int, encodings: list[str], delimiters: set[int]) -> str | None:
    """A top-level PN/LO/SH/DA value decoded with the data set's character sets (PS3.5 6.1); None when absent
    or empty. Never raises: bytes pydicom cannot decode fall back to latin-1 (byte for byte)."""
    elem = ds.get_item(tag, keep_deferred=True)
    value = None if elem is None else elem.value
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                text = decode_bytes(raw, encodings, delimiters)
        except Exception:  # a malformed escape sequence or an unknown term: keep the bytes readable
            text = raw.decode("latin-1")
    elif isinstance(value, str):
        text = value
    else:
        return None
    text = text.strip().strip("\x00").strip()
    return text[:DEMOGRAPHIC_MAX] or None


def _encodings(ds: Dataset) -> list[str]:
    """Python codecs for the data set's Specific Character Set (0008,0005); the default repertoire without one."""
    terms = _text(ds, CHARSET)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return convert_encodings([t.strip() for t in terms.split("\\")] if terms else None)
    except Exception:  # an unknown term: pydicom's default (ISO-IR 6), decoded leniently above
        return convert_encodings(None)


def _text(ds: Dataset, tag: int) -> str | None:
    """The value of a top-level text element, trimmed of padding; None when absent or empty."""
    elem = ds.get_item(tag, keep_deferred=True)  # the element as read: raw, unconverted
    if elem is None:
        return None
    value = elem.value
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).decode("latin-1")  # byte for byte: odd bytes survive to be flagged
    elif isinstance(value, str):
        text = value
    else:  # not text at all (e.g. a sequence where a UID belongs): counts as missing
        return None
    text = text.strip().strip("\x00").strip()
    return text or None


def _uid(ds: Dataset, tag: int, name: str) -> str | None:
    """The UID in a top-level UI element, padding removed (PS3.5 6.2); None when absent or empty (padding only).
    Raises MalformedInstance (0xC214) when the value is not a valid UID (:func:`unpadded_uid`); the reason
    names the attribute and the rule broken, never the value (it reaches the log)."""
    elem = ds.get_item(tag, keep_deferred=True)  # the element as read: raw, unconverted
    value = None if elem is None else elem.value
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).decode("latin-1")  # byte for byte: any odd byte is refused below
    elif isinstance(value, str):
        text = value
    else:  # absent, or not text at all (e.g. a sequence where a UID belongs): counts as missing
        return None
    if not text.strip("\x00 "):
        return None
    try:
        return unpadded_uid(text)
    except ValueError as exc:
        raise MalformedInstance(STATUS_INVALID_UID, f"{name} is not a valid UID (PS3.5 9.1): {exc}") from None


def _data_set_offset(data: bytes | bytearray) -> int | None:
    """Where the data set starts, from the file meta group length that opens every Part-10 file."""
    if data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        return None
    return 144 + int.from_bytes(data[140:144], "little")


@functools.lru_cache(maxsize=64)
def _plain_syntax(transfer_syntax: str | None) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) for a syntax whose data set is read as is; None for deflate/unknown."""
    if not transfer_syntax:
        return None
    try:
        ts = UID(transfer_syntax)
        if ts.is_deflated:
            return None
        return ts.is_implicit_VR, ts.is_little_endian
    except ValueError:
        return None


def check_encoding(first: bytes | bytearray | memoryview, transfer_syntax: str) -> None:
    """The first bytes of a data set (at least 6: tag and what follows it) must be encoded as the
    negotiated ``transfer_syntax`` says (PS3.5 7.1, PS3.8: a data set travels in its presentation
    context's transfer syntax). Raises MalformedInstance (0xC213) when they are not:

    * VR: an explicit VR syntax has two upper-case letters after the tag, an implicit one has a
      length there (pydicom's own test: a first element of 16 KiB would be needed to fool it);
    * byte order: every storable data set has a group 0008 element (SOP Class/Instance UID), and
      elements come in tag order, so the first group is 0002-0008; read in the wrong byte order
      0008 becomes 0800.

    A mismatch is claimed only when the first tag is plausible (group 0002-0008) in the encoding the
    bytes show: garbage is left to the parse (0xC210). Deflate and unknown syntaxes, and fewer than 6
    bytes, are not checked here.
    """
    plain = _plain_syntax(transfer_syntax)
    if plain is None or len(first) < 6:
        return
    implicit, little = plain
    group = int.from_bytes(first[0:2], "little" if little else "big")
    swapped = int.from_bytes(first[0:2], "big" if little else "little")
    if not _FIRST_GROUPS[0] <= group <= _FIRST_GROUPS[1]:
        if _FIRST_GROUPS[0] <= swapped <= _FIRST_GROUPS[1]:
            order = "big" if little else "little"
            raise MalformedInstance(
                STATUS_ENCODING_MISMATCH, f"{order} endian data set, transfer syntax {transfer_syntax}"
            )
        return  # not a plausible first tag either way: the parse decides
    looks_explicit = 0x40 < first[4] < 0x5B and 0x40 < first[5] < 0x5B
    if looks_explicit == implicit:
        found = "explicit" if looks_explicit else "implicit"
        raise MalformedInstance(STATUS_ENCODING_MISMATCH, f"{found} VR data set, transfer syntax {transfer_syntax}")


_FIRST_GROUPS = (0x0002, 0x0008)  # where a data set's first element can be (see check_encoding)


def _read(data: bytes | bytearray, transfer_syntax: str | None) -> Dataset:
    """The data set, raw. With the negotiated transfer syntax known (and not deflate) the data set is
    read directly, which skips re-parsing the file meta we wrote ourselves (half the cost)."""
    offset = _data_set_offset(data) if transfer_syntax else None
    plain = _plain_syntax(transfer_syntax)
    if offset is not None and plain is not None:
        assert transfer_syntax is not None
        check_encoding(memoryview(data)[offset : offset + 6], transfer_syntax)
        return read_dataset(io.BytesIO(memoryview(data)[offset:]), *plain)
    return dcmread(io.BytesIO(data))


def _parsed(read: Callable[[], Dataset]) -> Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return read()
    except MalformedInstance:
        raise
    except (InvalidDicomError, EOFError, ValueError, KeyError, NotImplementedError, OSError) as exc:
        raise MalformedInstance(STATUS_UNREADABLE, f"data set does not parse: {exc}") from exc
    except Exception as exc:  # pydicom raises many kinds on garbage; none may crash the server
        raise MalformedInstance(STATUS_UNREADABLE, f"data set does not parse: {type(exc).__name__}: {exc}") from exc


def _check_complete(ds: Dataset) -> None:
    for elem in ds.values():  # top-level elements as read (raw, unconverted): compare declared and actual length
        if (
            isinstance(elem, RawDataElement)
            and elem.length != UNDEFINED_LENGTH
            and elem.value is not None
            and len(elem.value) != elem.length
        ):
            raise MalformedInstance(
                STATUS_UNREADABLE, f"element {elem.tag} truncated: {len(elem.value)} of {elem.length} bytes"
            )


def parse_header(
    data: bytes | bytearray, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str | None = None
) -> InstanceHeader:
    """Parse the Part-10 bytes (our file meta + the data set exactly as received) and check them.

    Values stay raw (pydicom converts lazily), so this costs one pass over the element headers;
    pixel data is not decoded.
    """
    ds = _parsed(lambda: _read(data, transfer_syntax))  # check_encoding first, when the syntax is known
    _check_complete(ds)
    if len(ds) == 0:
        raise MalformedInstance(STATUS_UNREADABLE, "empty data set")
    return _identify(ds, sop_class_uid, sop_instance_uid)


class NotStreamable(Exception):
    """The header cannot be decided from a prefix (deflate, unknown syntax, or it looks malformed):
    the whole data set is parsed at the end instead, so the statuses stay those of ``parse_header``."""


@dataclass(frozen=True)
class EarlyHeader:
    """The header read from a prefix that reached the top-level Pixel Data element."""

    header: InstanceHeader
    pixel_offset: int  # where the Pixel Data element starts in the Part-10 bytes
    pixel_head: bytes  # its first (up to) 12 bytes: tag, VR, length


def parse_header_prefix(
    data: bytes | bytearray, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str
) -> EarlyHeader | None:
    """The header from the first bytes of an instance still arriving; None: more bytes are needed.

    Decided only when the parse reaches the top-level Pixel Data element: every element before it is
    then complete, and ``check_tail`` covers the rest once the last byte is in. Raises NotStreamable
    when only the whole data set can decide (see there).
    """
    offset = _data_set_offset(data)
    plain = _plain_syntax(transfer_syntax)
    if offset is None or plain is None:
        raise NotStreamable("no file meta or not a plain transfer syntax")
    if len(data) - offset < 6:
        return None
    try:
        check_encoding(memoryview(data)[offset : offset + 6], transfer_syntax)
    except MalformedInstance as bad:  # parse_header at the end answers it
        raise NotStreamable(str(bad)) from bad
    fp = io.BytesIO(memoryview(data)[offset:])
    reached: list[bool] = []

    def at_pixels(tag: int, vr: object, length: int) -> bool:
        if tag == PIXEL_DATA:
            reached.append(True)
            return True
        return False

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(fp, *plain, stop_when=at_pixels)
    except Exception:  # a prefix may end anywhere: undecided, unless it is clearly not streamable
        if len(data) - offset > PREFIX_GIVE_UP:
            raise NotStreamable("prefix does not parse") from None
        return None
    if not reached:
        if len(data) - offset > PREFIX_GIVE_UP:
            raise NotStreamable("no Pixel Data element in the first bytes")
        return None
    try:
        _check_complete(ds)
        if len(ds) == 0:
            raise MalformedInstance(STATUS_UNREADABLE, "empty data set")
        header = _identify(ds, sop_class_uid, sop_instance_uid)
    except MalformedInstance as bad:
        raise NotStreamable(str(bad)) from bad
    pixel_offset = offset + fp.tell()
    return EarlyHeader(header, pixel_offset, bytes(memoryview(data)[pixel_offset : pixel_offset + 12]))


def tail_is_exact(early: EarlyHeader, total: int, transfer_syntax: str) -> bool:
    """True when the Pixel Data element has a defined length and ends exactly at the last byte (the
    usual uncompressed instance): then the whole data set parses like its prefix, nothing to re-read."""
    plain = _plain_syntax(transfer_syntax)
    head = early.pixel_head
    if plain is None or len(head) < 8:
        return False
    implicit, little = plain
    order: Literal["little", "big"] = "little" if little else "big"
    if implicit:
        length, size = int.from_bytes(head[4:8], order), 8
    elif head[4:6] in (b"OB", b"OW", b"UN", b"OV", b"OF", b"OD", b"OL") and len(head) >= 12:
        length, size = int.from_bytes(head[8:12], order), 12
    else:
        return False
    return length != UNDEFINED_LENGTH and early.pixel_offset + size + length == total


def check_tail(tail: bytes | bytearray, transfer_syntax: str) -> None:
    """The elements from Pixel Data to the end (``tail``) must parse and be complete, as in
    ``parse_header``; raises MalformedInstance (0xC210) otherwise."""
    plain = _plain_syntax(transfer_syntax)
    if plain is None:
        raise MalformedInstance(STATUS_UNREADABLE, "not a plain transfer syntax")
    ds = _parsed(lambda: read_dataset(io.BytesIO(tail), *plain))
    _check_complete(ds)
    if len(ds) == 0:  # pydicom drops every element when one runs past the end (no delimiter)
        raise MalformedInstance(STATUS_UNREADABLE, "Pixel Data runs past the end of the data set")


def _identify(ds: Dataset, sop_class_uid: str, sop_instance_uid: str) -> InstanceHeader:
    study_uid = _uid(ds, STUDY_UID, "StudyInstanceUID")
    sop_uid = _uid(ds, SOP_UID, "SOPInstanceUID")
    series_uid = _uid(ds, SERIES_UID, "SeriesInstanceUID")
    sop_class = _text(ds, SOP_CLASS)
    if not study_uid:
        raise MalformedInstance(STATUS_MISSING_UID, "StudyInstanceUID missing or empty")
    if not sop_uid:
        raise MalformedInstance(STATUS_MISSING_UID, "SOPInstanceUID missing or empty")
    if sop_uid != sop_instance_uid.strip():  # no UID in the reason: it reaches the log
        raise MalformedInstance(
            STATUS_UID_MISMATCH, "SOPInstanceUID differs from the command's Affected SOP Instance UID"
        )
    if sop_class and sop_class != sop_class_uid.strip():
        raise MalformedInstance(
            STATUS_CLASS_MISMATCH, f"SOPClassUID {sop_class} differs from the command's {sop_class_uid}"
        )
    flags: list[str] = []
    if not sop_class:
        flags.append("no_sop_class_uid")
    if not series_uid:
        flags.append("no_series_uid")
    encodings = _encodings(ds)
    return InstanceHeader(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class_uid.strip(),
        modality=_text(ds, MODALITY),
        flags=tuple(flags),
        patient_name=_decoded(ds, PATIENT_NAME, encodings, _PN_DELIMITERS),
        patient_id=_decoded(ds, PATIENT_ID, encodings, _TEXT_DELIMITERS),
        accession_number=_decoded(ds, ACCESSION, encodings, _TEXT_DELIMITERS),
        study_date=_text(ds, STUDY_DATE),
    )
