"""The listener against a hostile imaging network (issue 11): probes and slow clients never lock out a
modality, and the smaller PS3.7/PS3.8 deviations, each with the hostile bytes written over a raw socket
and, where dcmtk's ``storescp`` gives a reference answer, compared with it.

dcmtk ``storescp`` (3.6.x) as the reference: protocol version without bit 0 -> A-ASSOCIATE-RJ 1/2/2; an
unknown item in the A-ASSOCIATE-RQ -> ignored; a presentation context without abstract syntax -> that
context result 3, the others accepted. Where storescp is not a model we follow the standard and say so:
it stores an instance whose SOP class differs from its presentation context's (PS3.7 and pynetdicom
answer 0x0122), it aborts the association on a data set in another encoding than negotiated (we answer a
failure status and keep the association), and it never answers a context without transfer syntax or with
sub-items that do not decode (we answer result 4 / 2 for that context, PS3.8 Table 9-18).
"""

from __future__ import annotations

import io
import select
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.filereader import read_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom.sop_class import Verification

from appliance.ingest.ul import pdu
from appliance.ingest.ul.server import STATUS_SOP_CLASS_NOT_SUPPORTED
from tests.test_dicom_ul import _item, _saved, _scp, echo_works, p_data, pdv, read_pdu
from testsupport.common import wait_until
from testsupport.dcmtk import echoscu, storescp, storescu, storescu_results
from testsupport.dicom import dataset_bytes, make_instance, spool_data_files

pytestmark = pytest.mark.integration

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"  # not among the box's imaging classes: proposed, then rejected


# --- raw A-ASSOCIATE-RQ pieces ---------------------------------------------------------------------------
APP = _item(0x10, pdu.APPLICATION_CONTEXT.encode())
USER = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4"))


def context(cid: int, abstract: str | None, syntaxes: list[str]) -> bytes:
    sub = (_item(0x30, abstract.encode()) if abstract is not None else b"") + b"".join(
        _item(0x40, ts.encode()) for ts in syntaxes
    )
    return _item(0x20, struct.pack(">B3x", cid) + sub)


def raw_rq(items: list[bytes], version: int = 1, called: str = "APPLIANCE") -> bytes:
    body = struct.pack(">H2x", version) + called.encode().ljust(16) + b"RAWSCU".ljust(16) + bytes(32) + b"".join(items)
    return pdu.HEADER.pack(pdu.ASSOCIATE_RQ, len(body)) + body


def context_results(ac_body: bytes) -> dict[int, int]:
    """Presentation context id -> result, from an A-ASSOCIATE-AC body."""
    out, pos = {}, 68
    while pos < len(ac_body):
        kind, length = struct.unpack_from(">BxH", ac_body, pos)
        if kind == 0x21:
            out[ac_body[pos + 4]] = ac_body[pos + 6]
        pos += 4 + length
    return out


def answer(port: int, raw: bytes) -> tuple[int, bytes]:
    """Send ``raw`` to a fresh connection; the first PDU back (type, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        return read_pdu(sock)


def store_rq(sop_class: str, sop_uid: str, message_id: int = 1) -> bytes:
    def ui(v: str) -> bytes:
        return v.encode() + (b"\0" if len(v) % 2 else b"")

    elems = [
        (0x0002, ui(sop_class)),
        (0x0100, struct.pack("<H", 0x0001)),
        (0x0110, struct.pack("<H", message_id)),
        (0x0700, struct.pack("<H", 0)),
        (0x0800, struct.pack("<H", 0x0000)),
        (0x1000, ui(sop_uid)),
    ]
    rest = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elems)
    return struct.pack("<HHII", 0, 0, 4, len(rest)) + rest


def send_store(sock: socket.socket, ctx: int, sop_class: str, sop_uid: str, body: bytes, message_id: int = 1) -> int:
    """One C-STORE over ``ctx`` (data set in 4000-byte fragments); the response's status."""
    sock.sendall(p_data(pdv(ctx, store_rq(sop_class, sop_uid, message_id), True)))
    chunks = [body[i : i + 4000] for i in range(0, len(body), 4000)] or [b""]
    for i, chunk in enumerate(chunks):
        sock.sendall(p_data(pdv(ctx, chunk, False, last=i == len(chunks) - 1)))
    kind, rsp = read_pdu(sock)
    assert kind == pdu.P_DATA_TF, (kind, rsp)
    return int(read_dataset(io.BytesIO(rsp[6:]), True, True).Status)


def instance_body(tmp_path: Path, sop_class: str = CTImageStorage, ts: str = ExplicitVRLittleEndian):
    """(SOP Instance UID, data set bytes encoded in ``ts``) of a fresh 64x64 image of ``sop_class``."""
    ds = make_instance(generate_uid(), generate_uid(), 1, sop_class=sop_class)
    path = _saved(ds, tmp_path / f"{generate_uid()}.dcm", ts)
    return str(ds.SOPInstanceUID), dataset_bytes(path.read_bytes())


@pytest.fixture(scope="module")
def reference_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """dcmtk storescp on an ephemeral port: the reference acceptor."""
    with storescp(tmp_path_factory.mktemp("storescp")) as port:
        yield port


def _rows(s) -> int:
    return int(s.store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"])


# --- availability ----------------------------------------------------------------------------------------
class Hostile:
    """20 idle sockets and 5 that send a valid A-ASSOCIATE-RQ one byte per second (never finishing)."""

    def __init__(self, port: int, idle: int = 20, slow: int = 5):
        self.idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(idle)]
        self.slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(slow)]
        self.sent = [0] * slow  # bytes each slow socket got out
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._trickle, args=(i,), daemon=True) for i in range(slow)]
        for t in self._threads:
            t.start()

    def _trickle(self, i: int) -> None:
        rq = raw_rq([APP, context(1, Verification, [ImplicitVRLittleEndian]), USER])
        for byte in rq[:-1]:  # never the last byte: the request never completes
            if self._stop.wait(1.0):
                return
            try:
                self.slow[i].sendall(bytes([byte]))
            except OSError:
                return
            self.sent[i] += 1

    def closed(self) -> list[bool]:
        """Whether the server has closed each socket (EOF or reset), idle ones first."""
        out = []
        for sock in self.idle + self.slow:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                out.append(False)
                continue
            try:
                out.append(sock.recv(1, socket.MSG_PEEK) == b"")
            except OSError:
                out.append(True)
        return out

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        for sock in self.idle + self.slow:
            sock.close()


def test_probes_and_slow_clients_never_lock_out_a_modality(tmp_path: Path) -> None:
    """25 connections that never complete a request (more than the pending budget of 16, far more than
    max_associations=1) do not keep dcmtk's echoscu and storescu out: the oldest pending ones are closed to
    make room, and pending connections never count as associations."""
    s = _scp(tmp_path / "box", max_associations=1, max_pending_connections=16, acse_timeout=120.0)
    assert s._server is not None
    hostile = Hostile(s.address[1])
    try:
        wait_until(lambda: s._server.pending() == 16 and sum(hostile.closed()) == 9, 60, "25 accepted, 9 evicted")
        assert hostile.closed()[:9] == [True] * 9  # the oldest went first
        echo = echoscu(s.address[1])
        assert echo.returncode == 0, echo.stdout
        f = tmp_path / "ct.dcm"
        _saved(make_instance(generate_uid(), generate_uid(), 1), f)
        out = storescu(s.address[1], [f])
        assert out.returncode == 0 and storescu_results(out.stdout) == {str(f): "Success"}, out.stdout
        assert _rows(s) == 1
        # the modalities got in while the hostile connections still held the pending budget
        assert s._server.pending() == 15 and sum(hostile.closed()) == 10
        assert s.active_associations() == 0
    finally:
        hostile.close()
        s.stop()


def test_artim_is_one_deadline_from_connect_not_restarted_by_each_byte(tmp_path: Path) -> None:
    """Idle sockets and sockets trickling a request byte by byte are all closed once the ARTIM timer
    (acse_timeout) runs out, while the trickling ones are still sending; the listener serves on."""
    s = _scp(tmp_path / "box", acse_timeout=3.0, max_pending_connections=64)
    assert s._server is not None
    hostile = Hostile(s.address[1])
    try:
        wait_until(lambda: all(hostile.closed()), 90, "every hostile connection closed by ARTIM")
        assert not hostile._stop.is_set() and all(0 < n < 60 for n in hostile.sent), hostile.sent
        wait_until(lambda: s._server.pending() == 0, 30, "no pending connection left")
        assert echoscu(s.address[1]).returncode == 0
    finally:
        hostile.close()
        s.stop()


def _associated_from(port: int, source: str, items: list[bytes]) -> socket.socket:
    """A raw association from ``source`` (another loopback address: another host to the listener)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(raw_rq(items))
    kind, body = read_pdu(sock)
    assert kind == pdu.ASSOCIATE_AC, (kind, body)
    return sock


def test_idle_associations_from_one_address_never_lock_out_a_modality(tmp_path: Path) -> None:
    """One host takes every association (max_associations=2) and sits idle in it (or keeps it alive with a
    C-ECHO now and then): a modality from another address still gets in, because an idle association of the
    address holding the most is aborted to make room. One in the middle of a data set is never taken: its
    instance completes and is stored. The hogging address gains nothing by asking again."""
    s = _scp(tmp_path / "box", max_associations=2)
    assert s._server is not None
    port = s.address[1]
    items = [
        APP,
        context(1, Verification, [ImplicitVRLittleEndian]),
        context(3, CTImageStorage, [ExplicitVRLittleEndian]),
        USER,
    ]
    busy = _associated_from(port, "127.0.0.2", items)  # the oldest: it would be taken first if it were idle
    idle = _associated_from(port, "127.0.0.2", items)
    try:
        wait_until(lambda: s.active_associations() == 2, 30, "two associations from 127.0.0.2")
        sop, body = instance_body(tmp_path)
        half = len(body) // 2
        busy.sendall(p_data(pdv(3, store_rq(CTImageStorage, sop), True)))
        busy.sendall(p_data(pdv(3, body[:half], False, last=False)))
        wait_until(lambda: any(a._received > half for a in s._server._established), 30, "half the data set received")

        # the hogging address asking again is refused: it already holds the most
        with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)) as third:
            third.sendall(raw_rq(items))
            kind, rj = read_pdu(third)
            assert kind == pdu.ASSOCIATE_RJ and rj[1:4] == bytes([0x02, 0x03, 0x02]), (kind, rj)

        echo = echoscu(port)  # a modality on 127.0.0.1
        assert echo.returncode == 0, echo.stdout
        kind, abort = read_pdu(idle)
        assert kind == pdu.ABORT and pdu.parse_abort(abort) == (pdu.SOURCE_PROVIDER, pdu.REASON_NOT_SPECIFIED)

        busy.sendall(p_data(pdv(3, body[half:], False, last=True)))
        kind, rsp = read_pdu(busy)
        assert kind == pdu.P_DATA_TF, (kind, rsp)
        assert int(read_dataset(io.BytesIO(rsp[6:]), True, True).Status) == 0x0000
        assert _rows(s) == 1

        f = tmp_path / "ct.dcm"
        _saved(make_instance(generate_uid(), generate_uid(), 1), f)
        out = storescu(port, [f])
        assert out.returncode == 0 and storescu_results(out.stdout) == {str(f): "Success"}, out.stdout
        assert _rows(s) == 2
    finally:
        idle.close()
        busy.close()
        s.stop()


class Trickle:
    """An association that sends ``payload`` one byte every ``every`` seconds, in its own thread."""

    def __init__(self, sock: socket.socket, payload: bytes, every: float = 0.4):
        self.sock, self.payload, self.every = sock, payload, every
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for byte in self.payload:
            if self._stop.wait(self.every):
                return
            try:
                self.sock.sendall(bytes([byte]))
            except OSError:
                return
            self.sent += 1

    def aborted(self) -> bool:
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        try:
            kind, body = read_pdu(self.sock)
        except OSError:
            return True
        return kind in (pdu.ABORT, 0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.mark.parametrize("where", ["data set", "command", "between messages"])
def test_a_message_trickled_byte_by_byte_does_not_hold_an_association(tmp_path: Path, where: str) -> None:
    """dimse_timeout and network_timeout are per read: a peer sending one byte every 0.4 s never lets them
    expire and so holds its association (and, in the middle of a message, one that is never idle) for ever.
    A message must arrive at a minimum rate once dimse_timeout has passed since its first byte: the trickle
    is aborted while still sending, its partial instance leaves nothing, and the listener serves on."""
    s = _scp(tmp_path / "box", dimse_timeout=2.0, network_timeout=2.0)
    items = [
        APP,
        context(1, Verification, [ImplicitVRLittleEndian]),
        context(3, CTImageStorage, [ExplicitVRLittleEndian]),
        USER,
    ]
    sock = _associated_from(s.address[1], "127.0.0.1", items)
    sop, body = instance_body(tmp_path)
    command = p_data(pdv(3, store_rq(CTImageStorage, sop), True))
    if where == "data set":
        sock.sendall(command)
        payload = p_data(pdv(3, body, False))
    elif where == "command":
        payload = command
    else:
        payload = p_data(pdv(1, b"\0" * 200, True))  # a PDU header and a command, one byte at a time
    trickle = Trickle(sock, payload)
    try:
        wait_until(trickle.aborted, 60, "the trickling association aborted")
        assert 0 < trickle.sent < len(payload), (trickle.sent, len(payload))
        wait_until(lambda: s.active_associations() == 0, 30, "its slot free")
        assert _rows(s) == 0 and spool_data_files(s.spool.root) == []
        f = tmp_path / "ct.dcm"
        _saved(make_instance(generate_uid(), generate_uid(), 1), f)
        out = storescu(s.address[1], [f])
        assert out.returncode == 0 and storescu_results(out.stdout) == {str(f): "Success"}, out.stdout
    finally:
        trickle.close()
        s.stop()


# --- PS3.8 association negotiation, raw bytes, with dcmtk as the reference --------------------------------
@pytest.fixture
def box(tmp_path: Path) -> Iterator:
    s = _scp(tmp_path / "box", accept_all_storage=False)
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize("version", [0x0000, 0x0002, 0xFFFE])
def test_protocol_version_without_bit_0_rejected_as_dcmtk_does(box, reference_port: int, version: int) -> None:
    rq = raw_rq([APP, context(1, Verification, [ImplicitVRLittleEndian]), USER], version=version)
    ours = answer(box.address[1], rq)
    theirs = answer(reference_port, raw_rq([APP, context(1, Verification, [ImplicitVRLittleEndian]), USER],
                                           version=version, called="STORESCP"))  # fmt: skip
    assert ours == theirs == (pdu.ASSOCIATE_RJ, b"\x00\x01\x02\x02")  # permanent, provider (ACSE), version
    # bit 0 set with other bits: version 1 is supported, the rest is not tested (PS3.8 9.3.2)
    kind, _ = answer(box.address[1], raw_rq([APP, context(1, Verification, [ImplicitVRLittleEndian]), USER], 0x0003))
    assert kind == pdu.ASSOCIATE_AC
    assert echo_works(box)


def test_unknown_item_in_request_is_ignored_as_dcmtk_does(box, reference_port: int) -> None:
    items = [APP, context(1, Verification, [ImplicitVRLittleEndian]), _item(0x77, b"future item"), USER]
    kind, body = answer(box.address[1], raw_rq(items))
    ref_kind, ref_body = answer(reference_port, raw_rq(items, called="STORESCP"))
    assert kind == ref_kind == pdu.ASSOCIATE_AC
    assert context_results(body) == context_results(ref_body) == {1: pdu.ACCEPTANCE}


def test_malformed_presentation_context_rejects_only_that_context(box, reference_port: int, tmp_path: Path) -> None:
    good = context(3, CTImageStorage, [ExplicitVRLittleEndian])
    no_abstract = context(1, None, [ExplicitVRLittleEndian])
    # the same answer as dcmtk: result 3 for the context without abstract syntax, the other accepted
    kind, body = answer(box.address[1], raw_rq([APP, no_abstract, good, USER]))
    ref_kind, ref_body = answer(reference_port, raw_rq([APP, no_abstract, good, USER], called="STORESCP"))
    assert kind == ref_kind == pdu.ASSOCIATE_AC
    assert context_results(body) == context_results(ref_body) == {1: 3, 3: 0}
    # dcmtk never answers these two; PS3.8 Table 9-18: 4 without transfer syntax, 2 when sub-items do not decode
    bad_items = _item(0x20, struct.pack(">B3x", 1) + b"\x30\x00\xff\xff1.2")
    for malformed, result in ((context(1, CTImageStorage, []), 4), (bad_items, 2)):
        with socket.create_connection(("127.0.0.1", box.address[1]), timeout=10) as sock:
            sock.sendall(raw_rq([APP, malformed, good, USER]))
            kind, body = read_pdu(sock)
            assert kind == pdu.ASSOCIATE_AC and context_results(body) == {1: result, 3: 0}
            sop, data = instance_body(tmp_path)
            assert send_store(sock, 3, CTImageStorage, sop, data) == 0x0000  # the good context works
    assert _rows(box) == 2


# --- PS3.7 C-STORE: the data set must fit the presentation context ---------------------------------------
def test_sop_class_rejected_then_sent_over_another_context_is_refused(box, tmp_path: Path) -> None:
    """MR is proposed on context 3 and rejected (not an imaging class here); an MR instance sent over the
    accepted CT context 1 is refused 0x0122 (PS3.7; pynetdicom's SCP answers the same, dcmtk storescp
    stores it) and not stored. So is an accepted class sent over another accepted class's context. The
    association goes on: a CT over its own context is stored."""
    items = [
        APP,
        context(1, CTImageStorage, [ExplicitVRLittleEndian]),
        context(3, MR_IMAGE_STORAGE, [ExplicitVRLittleEndian]),
        context(5, SecondaryCaptureImageStorage, [ExplicitVRLittleEndian]),
        USER,
    ]
    with socket.create_connection(("127.0.0.1", box.address[1]), timeout=10) as sock:
        sock.sendall(raw_rq(items))
        kind, body = read_pdu(sock)
        assert kind == pdu.ASSOCIATE_AC and context_results(body) == {1: 0, 3: 3, 5: 0}
        mr_sop, mr = instance_body(tmp_path, MR_IMAGE_STORAGE)
        assert send_store(sock, 1, MR_IMAGE_STORAGE, mr_sop, mr, 1) == STATUS_SOP_CLASS_NOT_SUPPORTED == 0x0122
        sc_sop, sc = instance_body(tmp_path, SecondaryCaptureImageStorage)
        assert send_store(sock, 1, SecondaryCaptureImageStorage, sc_sop, sc, 2) == 0x0122
        ct_sop, ct = instance_body(tmp_path)
        assert send_store(sock, 1, CTImageStorage, ct_sop, ct, 3) == 0x0000
        assert send_store(sock, 5, SecondaryCaptureImageStorage, sc_sop, sc, 4) == 0x0000
    rows = box.store.query("SELECT sop_instance_uid FROM instances ORDER BY id")
    assert [r["sop_instance_uid"] for r in rows] == [ct_sop, sc_sop]
    assert mr_sop not in {r["sop_instance_uid"] for r in rows} and len(spool_data_files(box.spool.root)) == 2


def test_duplicate_presentation_context_id_cannot_smuggle_a_rejected_sop_class(box, tmp_path: Path) -> None:
    """Context ID 1 proposed twice, first as CT (accepted), then as MR (not taken here): the acceptor answered
    both (two results for one ID in the A-ASSOCIATE-AC) and kept CT's transfer syntax but MR's abstract
    syntax, so an MR instance sent over context 1 passed the SOP-class check and was stored. Now the first
    proposal of an ID is the one negotiated, a repeat is left out of the answer, and MR over 1 is refused."""
    items = [
        APP,
        context(1, CTImageStorage, [ExplicitVRLittleEndian]),
        context(1, MR_IMAGE_STORAGE, [ExplicitVRLittleEndian]),
        USER,
    ]
    with socket.create_connection(("127.0.0.1", box.address[1]), timeout=10) as sock:
        sock.sendall(raw_rq(items))
        kind, body = read_pdu(sock)
        assert kind == pdu.ASSOCIATE_AC
        answers = [body[pos + 4 : pos + 7] for pos, k in _ac_items(body) if k == 0x21]
        assert answers == [bytes([1, 0, 0])], answers  # one answer for ID 1: accepted (CT)
        mr_sop, mr = instance_body(tmp_path, MR_IMAGE_STORAGE)
        assert send_store(sock, 1, MR_IMAGE_STORAGE, mr_sop, mr, 1) == STATUS_SOP_CLASS_NOT_SUPPORTED
        ct_sop, ct = instance_body(tmp_path)
        assert send_store(sock, 1, CTImageStorage, ct_sop, ct, 2) == 0x0000
    rows = box.store.query("SELECT sop_instance_uid FROM instances ORDER BY id")
    assert [r["sop_instance_uid"] for r in rows] == [ct_sop]


def _ac_items(ac_body: bytes) -> list[tuple[int, int]]:
    """(offset, item type) of each item of an A-ASSOCIATE-AC body."""
    out, pos = [], 68
    while pos < len(ac_body):
        kind, length = struct.unpack_from(">BxH", ac_body, pos)
        out.append((pos, kind))
        pos += 4 + length
    return out


@pytest.mark.parametrize(
    ("negotiated", "encoded"),
    [
        (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
        (ImplicitVRLittleEndian, ExplicitVRLittleEndian),
        (ExplicitVRLittleEndian, ExplicitVRBigEndian),
        (ExplicitVRBigEndian, ExplicitVRLittleEndian),
    ],
)
def test_data_set_not_in_the_negotiated_transfer_syntax_is_refused(
    box, tmp_path: Path, negotiated: str, encoded: str
) -> None:
    """Acked and filed unreadable before; now a failure status (0xC213), nothing stored, the association
    goes on (dcmtk storescp aborts the association instead)."""
    with socket.create_connection(("127.0.0.1", box.address[1]), timeout=10) as sock:
        sock.sendall(raw_rq([APP, context(1, CTImageStorage, [negotiated]), USER]))
        kind, body = read_pdu(sock)
        assert kind == pdu.ASSOCIATE_AC and context_results(body) == {1: 0}
        sop, wrong = instance_body(tmp_path, ts=encoded)
        assert send_store(sock, 1, CTImageStorage, sop, wrong, 1) == 0xC213
        assert _rows(box) == 0 and not spool_data_files(box.spool.root)
        sop, right = instance_body(tmp_path, ts=negotiated)
        assert send_store(sock, 1, CTImageStorage, sop, right, 2) == 0x0000
    assert _rows(box) == 1


def test_allowlist_closes_unknown_addresses_at_accept(tmp_path: Path) -> None:
    """With the allowlist on, a connection from an address no entry could admit is closed at once: it
    never waits for ARTIM nor takes a pending slot. An address an entry names still gets A-ASSOCIATE-RJ
    for a wrong AE title (the existing rule), and the right caller gets in."""
    far = _scp(tmp_path / "far", allowlist_enabled=True, allowed_callers=[{"ae_title": "XRAY1", "host": "10.9.9.9"}])
    try:
        with socket.create_connection(("127.0.0.1", far.address[1]), timeout=20) as sock:
            assert read_pdu(sock) == (0, b"")  # closed without a word, long before acse_timeout (30 s)
        assert far._server is not None and far._server.pending() == 0
    finally:
        far.stop()
    near = _scp(tmp_path / "near", allowlist_enabled=True, allowed_callers=[{"ae_title": "XRAY1", "host": "127.0.0.1"}])
    try:
        items = [APP, context(1, Verification, [ImplicitVRLittleEndian]), USER]
        kind, body = answer(near.address[1], raw_rq(items))  # calling AE "RAWSCU" is not XRAY1
        assert kind == pdu.ASSOCIATE_RJ and body == b"\x00\x01\x01\x03"
        assert echoscu(near.address[1], aet="XRAY1").returncode == 0
    finally:
        near.stop()
