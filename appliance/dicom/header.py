"""Read the few identifying fields of a received instance, and decide whether it can be filed at all.

Malformed-input policy (one rule, applied to every C-STORE): an instance is *refused* with a DIMSE
failure status only when the box cannot file it correctly — its data set does not parse, an element
is truncated, the Study or SOP Instance UID is missing, or the data set contradicts the C-STORE
command (SOP class / instance UID). Everything else is stored byte-for-byte and recorded, with any
oddity noted in ``instances.flags`` (e.g. ``no_series_uid``); whether the models can use it is the
pipeline's decision, not the receiver's. Nothing is ever acknowledged and then dropped.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.uid import UID

# Failure statuses (PS3.4 C-STORE): 0xC000-0xCFFF "cannot understand", 0xA900 "does not match SOP class".
STATUS_UNREADABLE = 0xC210
STATUS_MISSING_UID = 0xC211
STATUS_UID_MISMATCH = 0xC212
STATUS_CLASS_MISMATCH = 0xA900

UNDEFINED_LENGTH = 0xFFFFFFFF
# Error Comment (LO, at most 64 characters) sent back with each failure status; the log has the detail.
COMMENTS = {
    STATUS_UNREADABLE: "data set does not parse or an element is truncated",
    STATUS_MISSING_UID: "Study or SOP Instance UID missing",
    STATUS_UID_MISMATCH: "SOP Instance UID differs from the C-STORE command",
    STATUS_CLASS_MISMATCH: "SOP Class UID differs from the C-STORE command",
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


def _text(ds, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # a value that does not decode counts as missing
        return None
    if value is None:
        return None
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _data_set_offset(data: bytes | bytearray) -> int | None:
    """Where the data set starts, from the file meta group length that opens every Part-10 file."""
    if data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        return None
    return 144 + int.from_bytes(data[140:144], "little")


def _read(data: bytes | bytearray, transfer_syntax: str | None) -> Dataset:
    """The data set, raw. With the negotiated transfer syntax known (and not deflate) the data set is
    read directly, which skips re-parsing the file meta we wrote ourselves (half the cost)."""
    offset = _data_set_offset(data) if transfer_syntax else None
    if offset is not None:
        try:
            ts = UID(transfer_syntax)
            implicit, little, deflated = ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated
        except ValueError:  # not a transfer syntax pydicom knows: let dcmread decide
            deflated = True
        if not deflated:
            return read_dataset(io.BytesIO(memoryview(data)[offset:]), implicit, little)
    return dcmread(io.BytesIO(data))


def parse_header(
    data: bytes | bytearray, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str | None = None
) -> InstanceHeader:
    """Parse the Part-10 bytes (our file meta + the data set exactly as received) and check them.

    Values stay raw (pydicom converts lazily), so this costs one pass over the element headers;
    pixel data is not decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = _read(data, transfer_syntax)
    except (InvalidDicomError, EOFError, ValueError, KeyError, NotImplementedError, OSError) as exc:
        raise MalformedInstance(STATUS_UNREADABLE, f"data set does not parse: {exc}") from exc
    except Exception as exc:  # pydicom raises many kinds on garbage; none may crash the server
        raise MalformedInstance(STATUS_UNREADABLE, f"data set does not parse: {type(exc).__name__}: {exc}") from exc

    for elem in ds._dict.values():  # top-level elements, still raw: compare declared and actual length
        if (
            isinstance(elem, RawDataElement)
            and elem.length != UNDEFINED_LENGTH
            and elem.value is not None
            and len(elem.value) != elem.length
        ):
            raise MalformedInstance(
                STATUS_UNREADABLE, f"element {elem.tag} truncated: {len(elem.value)} of {elem.length} bytes"
            )
    if len(ds._dict) == 0:
        raise MalformedInstance(STATUS_UNREADABLE, "empty data set")

    study_uid = _text(ds, "StudyInstanceUID")
    sop_uid = _text(ds, "SOPInstanceUID")
    sop_class = _text(ds, "SOPClassUID")
    if not study_uid:
        raise MalformedInstance(STATUS_MISSING_UID, "StudyInstanceUID missing or empty")
    if not sop_uid:
        raise MalformedInstance(STATUS_MISSING_UID, "SOPInstanceUID missing or empty")
    if sop_uid != sop_instance_uid.strip():
        raise MalformedInstance(
            STATUS_UID_MISMATCH, f"SOPInstanceUID {sop_uid} differs from the command's {sop_instance_uid}"
        )
    if sop_class and sop_class != sop_class_uid.strip():
        raise MalformedInstance(
            STATUS_CLASS_MISMATCH, f"SOPClassUID {sop_class} differs from the command's {sop_class_uid}"
        )
    flags: list[str] = []
    if not sop_class:
        flags.append("no_sop_class_uid")
    series_uid = _text(ds, "SeriesInstanceUID")
    if not series_uid:
        flags.append("no_series_uid")
    for name, uid in (("study", study_uid), ("series", series_uid), ("sop", sop_uid)):
        if uid and (len(uid) > 64 or not all(c.isdigit() or c == "." for c in uid)):
            flags.append(f"nonconformant_{name}_uid")
    return InstanceHeader(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class_uid.strip(),
        modality=_text(ds, "Modality"),
        flags=tuple(flags),
    )
