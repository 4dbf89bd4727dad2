"""Upper Layer PDUs (PS3.8 section 9.3): decode what a requestor sends, encode what an acceptor answers.

Only the acceptor's side: A-ASSOCIATE-RQ is decoded in full (unknown items and sub-items are skipped,
never fatal, as dcmtk does; a malformed presentation context item is kept as a rejected proposal so
only that context is refused, PS3.8 Table 9-18), A-ASSOCIATE-AC/RJ, A-RELEASE-RP, A-ABORT and P-DATA-TF are
encoded. P-DATA-TF is *decoded* by the server itself, PDV by PDV, so data set bytes go straight into
the instance buffer. Every length is checked against what is really there; a bad PDU raises
:class:`PDUError` carrying the A-ABORT reason to answer with.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

ASSOCIATE_RQ = 0x01
ASSOCIATE_AC = 0x02
ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
RELEASE_RQ = 0x05
RELEASE_RP = 0x06
ABORT = 0x07
KNOWN_TYPES = frozenset({ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT})

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# Our identity in A-ASSOCIATE-AC and in the file meta of every spool file (a UID under pydicom's root).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.52254341106547747372197994340038004265"
IMPLEMENTATION_VERSION = "APPLIANCE_010"

# Association-control PDUs are buffered whole; a claim beyond this is hostile or garbage.
MAX_CONTROL_PDU = 1 << 20

HEADER = struct.Struct(">BxI")  # PDU type, reserved, length
PDV_HEADER = struct.Struct(">IBB")  # item length (incl. the next two bytes), context id, control header
_ITEM = struct.Struct(">BxH")  # item type, reserved, item length

# A-ABORT source and reasons (PS3.8 9.3.8)
SOURCE_USER = 0x00
SOURCE_PROVIDER = 0x02
REASON_NOT_SPECIFIED = 0x00
REASON_UNRECOGNIZED_PDU = 0x01
REASON_UNEXPECTED_PDU = 0x02
REASON_UNRECOGNIZED_PARAMETER = 0x04
REASON_UNEXPECTED_PARAMETER = 0x05
REASON_INVALID_PARAMETER = 0x06

# Presentation context results (PS3.8 9.3.3.2, Table 9-18)
ACCEPTANCE = 0x00
USER_REJECTION = 0x01
NO_REASON = 0x02  # provider rejection, no reason given: a context item that does not decode
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04

# Protocol-version field (PS3.8 9.3.2): bit 0 is version 1, the only one; a receiver tests that bit only.
PROTOCOL_VERSION_1 = 0x0001
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"  # the Transfer Syntax sub-item of a refused context without one


class PDUError(Exception):
    """The peer sent something that is not a valid PDU here; answer A-ABORT with ``reason``."""

    def __init__(self, message: str, reason: int = REASON_INVALID_PARAMETER):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ProposedContext:
    """One presentation context item of an A-ASSOCIATE-RQ (PS3.8 9.3.2.2).

    ``defect`` is None for a well-formed item; else the result it must be answered with (Table 9-18:
    ``NO_REASON`` when its sub-items do not decode, ``ABSTRACT_SYNTAX_NOT_SUPPORTED`` without an
    abstract syntax, ``TRANSFER_SYNTAXES_NOT_SUPPORTED`` without a transfer syntax).
    """

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    defect: int | None = None


@dataclass
class AssociateRequest:
    """The parts of an A-ASSOCIATE-RQ an acceptor acts on (the rest is parsed and ignored)."""

    called_ae: str
    calling_ae: str
    called_raw: bytes  # echoed back verbatim in the AC, as PS3.8 asks
    calling_raw: bytes
    protocol_version: int = PROTOCOL_VERSION_1  # the raw 16-bit field; bit 0 must be set
    application_context: str = ""
    contexts: list[ProposedContext] = field(default_factory=list)
    max_pdu: int = 0  # the requestor's maximum receive length; 0 = unlimited
    implementation_class_uid: str = ""
    implementation_version: str = ""
    async_ops: tuple[int, int] | None = None
    roles: dict[str, tuple[int, int]] = field(default_factory=dict)  # SOP class -> (SCU role, SCP role)
    ignored_items: list[int] = field(default_factory=list)  # item types skipped as unknown
    # presentation context IDs proposed again after their first proposal: left out (not negotiated, not answered)
    duplicate_context_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ContextResult:
    context_id: int
    result: int
    transfer_syntax: str


def _uid(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip("\x00 ").strip()


def _items(body: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    """Split ``body[start:end]`` into (item type, item value); the lengths must tile it exactly."""
    out: list[tuple[int, bytes]] = []
    pos = start
    while pos < end:
        if end - pos < _ITEM.size:
            raise PDUError(f"truncated item header at offset {pos}")
        kind, length = _ITEM.unpack_from(body, pos)
        pos += _ITEM.size
        if pos + length > end:
            raise PDUError(f"item 0x{kind:02X} claims {length} bytes, only {end - pos} left")
        out.append((kind, body[pos : pos + length]))
        pos += length
    return out


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """Decode the body (after the 6-byte header) of an A-ASSOCIATE-RQ (PS3.8 9.3.2).

    Returns the request; the protocol version is returned as sent (the acceptor rejects one without
    bit 0). Items of an unknown type are skipped, as dcmtk does; a presentation context item whose
    sub-items do not decode becomes a proposal with a ``defect`` (only that context is refused); a
    presentation context ID proposed a second time is left out (``duplicate_context_ids``): the first
    proposal of an ID is the one negotiated and answered.
    Raises PDUError when the PDU itself does not decode (fixed fields short, item lengths that do
    not tile the PDU) or has no application context.
    """
    if len(body) < 68:
        raise PDUError(f"A-ASSOCIATE-RQ too short ({len(body)} bytes)")
    called_raw, calling_raw = body[4:20], body[20:36]
    rq = AssociateRequest(
        called_ae=called_raw.decode("ascii", "replace").strip(),
        calling_ae=calling_raw.decode("ascii", "replace").strip(),
        called_raw=called_raw,
        calling_raw=calling_raw,
        protocol_version=struct.unpack_from(">H", body, 0)[0],
    )
    for kind, value in _items(body, 68, len(body)):
        if kind == 0x10:
            rq.application_context = _uid(value)
        elif kind == 0x20:
            proposed = _parse_proposed_context(value)
            if proposed is None:
                continue
            if any(cx.context_id == proposed.context_id for cx in rq.contexts):
                # PS3.8 9.3.2.2: an ID names one proposal. Answering both (and mixing one's transfer syntax
                # with the other's abstract syntax) let a refused SOP class through: the first one stands.
                rq.duplicate_context_ids.append(proposed.context_id)
                continue
            rq.contexts.append(proposed)
        elif kind == 0x50:
            _parse_user_information(value, rq)
        else:
            rq.ignored_items.append(kind)  # unknown item: skipped, as dcmtk's acceptor does
    if not rq.application_context:
        raise PDUError("A-ASSOCIATE-RQ without application context", REASON_INVALID_PARAMETER)
    return rq


def _parse_proposed_context(value: bytes) -> ProposedContext | None:
    """One presentation context item; None for an empty item (no context ID to answer)."""
    if not value:
        return None
    context_id = value[0]
    if len(value) < 4:
        return ProposedContext(context_id, "", (), NO_REASON)
    abstracts: list[str] = []
    syntaxes: list[str] = []
    try:
        subs = _items(value, 4, len(value))
    except PDUError:
        return ProposedContext(context_id, "", (), NO_REASON)
    for kind, sub in subs:
        if kind == 0x30:
            abstracts.append(_uid(sub))
        elif kind == 0x40:
            syntaxes.append(_uid(sub))
        # other sub-items are not defined for a proposal: skipped
    syntaxes = [ts for ts in syntaxes if ts]
    if len(abstracts) > 1:
        return ProposedContext(context_id, abstracts[0], tuple(syntaxes), NO_REASON)
    if not abstracts or not abstracts[0]:
        return ProposedContext(context_id, "", tuple(syntaxes), ABSTRACT_SYNTAX_NOT_SUPPORTED)
    if not syntaxes:
        return ProposedContext(context_id, abstracts[0], (), TRANSFER_SYNTAXES_NOT_SUPPORTED)
    return ProposedContext(context_id, abstracts[0], tuple(syntaxes))


def _parse_user_information(value: bytes, rq: AssociateRequest) -> None:
    for kind, sub in _items(value, 0, len(value)):
        if kind == 0x51 and len(sub) == 4:
            rq.max_pdu = struct.unpack(">I", sub)[0]
        elif kind == 0x52:
            rq.implementation_class_uid = _uid(sub)
        elif kind == 0x55:
            rq.implementation_version = sub.decode("ascii", "replace").strip()
        elif kind == 0x53 and len(sub) == 4:
            rq.async_ops = struct.unpack(">HH", sub)
        elif kind == 0x54 and len(sub) >= 4:
            (n,) = struct.unpack_from(">H", sub)
            if 2 + n + 2 <= len(sub):
                rq.roles[_uid(sub[2 : 2 + n])] = (sub[2 + n], sub[3 + n])
        # 0x56/0x57 extended negotiation, 0x58 user identity, anything newer: tolerated, not answered


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM.pack(kind, len(value)) + value


def _uid_bytes(uid: str) -> bytes:
    return uid.encode("ascii", "replace")


def encode_associate_ac(rq: AssociateRequest, results: list[ContextResult], max_pdu: int) -> bytes:
    """A-ASSOCIATE-AC: one result per proposed context, our max receive length and identity.

    No role-selection or async-ops reply: default roles (the requestor is SCU) and synchronous
    operation apply, which is all a storage SCP offers.
    """
    parts = [
        struct.pack(">H2x", 1),
        rq.called_raw.ljust(16, b" "),
        rq.calling_raw.ljust(16, b" "),
        bytes(32),
        _item(0x10, _uid_bytes(APPLICATION_CONTEXT)),
    ]
    for r in results:
        ts = _item(0x40, _uid_bytes(r.transfer_syntax))
        parts.append(_item(0x21, struct.pack(">BxBx", r.context_id, r.result) + ts))
    user = (
        _item(0x51, struct.pack(">I", max_pdu))
        + _item(0x52, _uid_bytes(IMPLEMENTATION_CLASS_UID))
        + _item(0x55, IMPLEMENTATION_VERSION.encode("ascii"))
    )
    parts.append(_item(0x50, user))
    body = b"".join(parts)
    return HEADER.pack(ASSOCIATE_AC, len(body)) + body


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    return HEADER.pack(ASSOCIATE_RJ, 4) + struct.pack(">xBBB", result, source, reason)


def encode_release_rp() -> bytes:
    return HEADER.pack(RELEASE_RP, 4) + bytes(4)


def encode_abort(source: int, reason: int) -> bytes:
    return HEADER.pack(ABORT, 4) + struct.pack(">xxBB", source, reason)


def parse_abort(body: bytes) -> tuple[int, int]:
    """(source, reason) of an A-ABORT; a short body reads as (0, 0) — the peer is gone either way."""
    return (body[2], body[3]) if len(body) >= 4 else (0, 0)


def encode_p_data(context_id: int, payload: bytes, is_command: bool, max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying ``payload`` as one message part, fragmented to the peer's max length."""
    flag = 0x01 if is_command else 0x00
    # PDV item overhead inside a PDU: 4-byte item length + context id + control header
    room = max_pdu - 6 if max_pdu else len(payload) or 1
    if room < 1:
        room = 1
    out: list[bytes] = []
    pos = 0
    while True:
        chunk = payload[pos : pos + room]
        pos += len(chunk)
        last = pos >= len(payload)
        pdv = PDV_HEADER.pack(len(chunk) + 2, context_id, flag | (0x02 if last else 0)) + chunk
        out.append(HEADER.pack(P_DATA_TF, len(pdv)) + pdv)
        if last:
            return b"".join(out)
