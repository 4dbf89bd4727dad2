"""DIMSE command sets (PS3.7 section 9/E): implicit VR little endian, group 0000 only.

Decoding keeps raw values keyed by tag and pulls out the handful of fields C-ECHO and C-STORE need;
encoding writes responses with ``struct`` (CommandGroupLength first), which is all the SCP sends.
``part10_prefix`` builds the preamble and file meta for a received data set, so the instance buffer
starts as a Part-10 file and the data set bytes are appended to it exactly as received.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from appliance.ingest.ul.pdu import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
NO_DATA_SET = 0x0101

VERIFICATION = "1.2.840.10008.1.1"

_ELEMENT = struct.Struct("<HHI")  # group, element, length
_TAG_CLASS = 0x0002
_TAG_FIELD = 0x0100
_TAG_MESSAGE_ID = 0x0110
_TAG_RESPONDED_TO = 0x0120
_TAG_DATA_SET_TYPE = 0x0800
_TAG_STATUS = 0x0900
_TAG_ERROR_COMMENT = 0x0902
_TAG_INSTANCE = 0x1000


class CommandError(ValueError):
    """The command set does not decode; the association is aborted."""


@dataclass(frozen=True)
class Command:
    """A DIMSE request: the fields the SCP uses."""

    field: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    has_data_set: bool


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip("\x00 ").strip()


def _us(raw: bytes, name: str) -> int:
    if len(raw) != 2:
        raise CommandError(f"{name} has {len(raw)} bytes, expected 2")
    return int.from_bytes(raw, "little")


def decode_command(data: bytes | bytearray) -> Command:
    """Decode a command set; every element must be group 0000 and lie wholly inside ``data``."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < _ELEMENT.size:
            raise CommandError(f"truncated element header at offset {pos}")
        group, elem, length = _ELEMENT.unpack_from(data, pos)
        pos += _ELEMENT.size
        if group != 0x0000:
            raise CommandError(f"element ({group:04X},{elem:04X}) outside the command group")
        if length > end - pos:
            raise CommandError(f"element (0000,{elem:04X}) claims {length} bytes, only {end - pos} left")
        values[elem] = bytes(data[pos : pos + length])
        pos += length
    if _TAG_FIELD not in values or _TAG_DATA_SET_TYPE not in values:
        raise CommandError("command set without CommandField or CommandDataSetType")
    return Command(
        field=_us(values[_TAG_FIELD], "CommandField"),
        message_id=_us(values.get(_TAG_MESSAGE_ID, b"\0\0"), "MessageID"),
        sop_class_uid=_text(values.get(_TAG_CLASS, b"")),
        sop_instance_uid=_text(values.get(_TAG_INSTANCE, b"")),
        has_data_set=_us(values[_TAG_DATA_SET_TYPE], "CommandDataSetType") != NO_DATA_SET,
    )


def _element(elem: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, elem, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii", "replace")
    return raw + b"\0" if len(raw) % 2 else raw


def _lo(text: str) -> bytes:
    raw = text.encode("ascii", "replace")[:64]
    return raw + b" " if len(raw) % 2 else raw


def encode_response(
    field: int,
    message_id: int,
    sop_class_uid: str,
    status: int,
    sop_instance_uid: str | None = None,
    error_comment: str | None = None,
) -> bytes:
    """A C-ECHO-RSP / C-STORE-RSP command set (no data set), elements in tag order."""
    body = [
        _element(_TAG_CLASS, _ui(sop_class_uid)),
        _element(_TAG_FIELD, struct.pack("<H", field)),
        _element(_TAG_RESPONDED_TO, struct.pack("<H", message_id)),
        _element(_TAG_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        _element(_TAG_STATUS, struct.pack("<H", status)),
    ]
    if error_comment:
        body.append(_element(_TAG_ERROR_COMMENT, _lo(error_comment)))
    if sop_instance_uid is not None:
        body.append(_element(_TAG_INSTANCE, _ui(sop_instance_uid)))
    rest = b"".join(body)
    return _element(0x0000, struct.pack("<I", len(rest))) + rest


def _meta(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def part10_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and file meta (explicit VR little endian) for a data set received as is."""
    version = IMPLEMENTATION_VERSION.encode("ascii")
    meta = b"".join(
        (
            _meta(0x0001, b"OB", b"\x00\x01"),
            _meta(0x0002, b"UI", _ui(sop_class_uid)),
            _meta(0x0003, b"UI", _ui(sop_instance_uid)),
            _meta(0x0010, b"UI", _ui(transfer_syntax)),
            _meta(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
            _meta(0x0013, b"SH", version + b" " if len(version) % 2 else version),
        )
    )
    return b"\0" * 128 + b"DICM" + _meta(0x0000, b"UL", struct.pack("<I", len(meta))) + meta
