"""The lean Upper Layer acceptor (appliance/ingest/ul): PDU/DIMSE decoding of bad input, the protocol
over raw sockets, and interop with pynetdicom as the SCU (echo, store, fragmentation both ways)."""

from __future__ import annotations

import hashlib
import io
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.filereader import read_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from appliance.core.config import DicomConfig
from appliance.core.store import Store
from appliance.ingest.scp import StorageSCP
from appliance.ingest.spool import Spool
from appliance.ingest.ul import dimse, pdu
from appliance.ingest.ul.server import negotiate
from testsupport.dcmtk import storescu, storescu_results
from testsupport.dicom import dataset_bytes, make_instance, part10, spool_data_files, write_series

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
RLE = "1.2.840.10008.1.2.5"


# --- building blocks for raw-socket tests -----------------------------------------------------------
def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(value)) + value


def assoc_rq(
    contexts: list[tuple[int, str, list[str]]],
    calling: str = "RAWSCU",
    max_pdu: int = 16384,
    app: str = pdu.APPLICATION_CONTEXT,
    extra_user_items: bytes = b"",
) -> bytes:
    items = [_item(0x10, app.encode())]
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        items.append(_item(0x20, struct.pack(">B3x", cid) + sub))
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.3.4") + extra_user_items
    items.append(_item(0x50, user))
    body = struct.pack(">H2x", 1) + b"APPLIANCE".ljust(16) + calling.encode().ljust(16) + bytes(32) + b"".join(items)
    return pdu.HEADER.pack(pdu.ASSOCIATE_RQ, len(body)) + body


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """(type, body) of the next PDU; (0, b"") when the server closed the connection."""
    head = _recv(sock, 6)
    if len(head) < 6:
        return 0, b""
    kind, length = pdu.HEADER.unpack(head)
    return kind, _recv(sock, length)


def _recv(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def pdv(ctx: int, payload: bytes, command: bool, last: bool = True) -> bytes:
    return pdu.PDV_HEADER.pack(len(payload) + 2, ctx, (1 if command else 0) | (2 if last else 0)) + payload


def p_data(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return pdu.HEADER.pack(pdu.P_DATA_TF, len(body)) + body


def echo_rq(message_id: int = 1) -> bytes:
    elems = [
        (0x0002, Verification.encode() + (b"\0" if len(Verification) % 2 else b"")),
        (0x0100, struct.pack("<H", dimse.C_ECHO_RQ)),
        (0x0110, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", dimse.NO_DATA_SET)),
    ]
    rest = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elems)
    return struct.pack("<HHII", 0, 0, 4, len(rest)) + rest


VERIFY_CX = [(1, Verification, [ImplicitVRLittleEndian])]


# --- in-process SCP ------------------------------------------------------------------------------------
def _scp(tmp_path: Path, **cfg: object) -> StorageSCP:
    settings = {"port": 0, "min_free_bytes": 0, "accept_all_storage": True, **cfg}
    scp = StorageSCP(DicomConfig(**settings), Store(tmp_path / "state.db"), Spool(tmp_path / "spool"))
    scp.start()
    return scp


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StorageSCP]:
    s = _scp(tmp_path, acse_timeout=2.0, max_pdu=4096)
    try:
        yield s
    finally:
        s.stop()


def connect(scp: StorageSCP) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", scp.address[1]), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def associate(scp: StorageSCP, contexts=VERIFY_CX, **kw: object) -> socket.socket:
    sock = connect(scp)
    sock.sendall(assoc_rq(contexts, **kw))
    kind, _ = read_pdu(sock)
    assert kind == pdu.ASSOCIATE_AC
    return sock


def echo_works(scp: StorageSCP) -> bool:
    ae = AE(ae_title="CHECK")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.address[1], ae_title="APPLIANCE")
    try:
        return assoc.is_established and int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def expect_abort(sock: socket.socket) -> tuple[int, int]:
    kind, body = read_pdu(sock)
    assert kind == pdu.ABORT, (kind, body)
    return pdu.parse_abort(body)


# --- pure decoding --------------------------------------------------------------------------------------
def test_associate_rq_parsed_with_user_information_items() -> None:
    role = struct.pack(">H", len(CTImageStorage)) + CTImageStorage.encode() + b"\x01\x00"
    extra = (
        _item(0x53, struct.pack(">HH", 3, 1))
        + _item(0x54, role)
        + _item(0x55, b"RAW_1")
        + _item(0x56, b"\x00\x04junk")  # SOP class extended negotiation: tolerated, not answered
        + _item(0x58, b"\x01\x00\x00\x04user\x00\x00")  # user identity: tolerated
        + _item(0x77, b"future item")
    )
    raw = assoc_rq([(1, CTImageStorage, [JPEG_BASELINE, ExplicitVRLittleEndian])], max_pdu=1234, extra_user_items=extra)
    rq = pdu.parse_associate_rq(raw[6:])
    assert (rq.called_ae, rq.calling_ae, rq.max_pdu) == ("APPLIANCE", "RAWSCU", 1234)
    assert rq.contexts == [pdu.ProposedContext(1, CTImageStorage, (JPEG_BASELINE, ExplicitVRLittleEndian))]
    assert rq.async_ops == (3, 1) and rq.roles == {CTImageStorage: (1, 0)}
    assert (rq.implementation_class_uid, rq.implementation_version) == ("1.2.3.4", "RAW_1")


def test_associate_rq_truncated_or_wrong_lengths_raise() -> None:
    raw = assoc_rq([(1, CTImageStorage, [ExplicitVRLittleEndian])])[6:]
    for cut in (0, 10, 67, 70, len(raw) - 1):
        with pytest.raises(pdu.PDUError):
            pdu.parse_associate_rq(raw[:cut])
    # an item that claims more bytes than the PDU holds
    bad = bytearray(raw)
    struct.pack_into(">H", bad, 68 + 2, 0xFFFF)
    with pytest.raises(pdu.PDUError, match="claims"):
        pdu.parse_associate_rq(bytes(bad))
    # a context without transfer syntax is decoded as a refused proposal (only it is rejected: PS3.8 Table 9-18)
    no_ts = assoc_rq([(1, CTImageStorage, [])])[6:]
    assert pdu.parse_associate_rq(no_ts).contexts == [
        pdu.ProposedContext(1, CTImageStorage, (), pdu.TRANSFER_SYNTAXES_NOT_SUPPORTED)
    ]


def test_negotiation_uses_acceptor_preference_and_result_reasons() -> None:
    supported = {CTImageStorage: (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG_BASELINE)}
    proposed = [
        pdu.ProposedContext(3, CTImageStorage, (JPEG_BASELINE, ImplicitVRLittleEndian)),
        pdu.ProposedContext(1, "1.2.3.999", (ExplicitVRLittleEndian,)),
        pdu.ProposedContext(5, CTImageStorage, ("1.2.840.10008.1.2.4.90",)),
    ]
    assert negotiate(proposed, supported) == [
        pdu.ContextResult(1, pdu.ABSTRACT_SYNTAX_NOT_SUPPORTED, ExplicitVRLittleEndian),
        pdu.ContextResult(3, pdu.ACCEPTANCE, ImplicitVRLittleEndian),  # ours first: implicit before JPEG
        pdu.ContextResult(5, pdu.TRANSFER_SYNTAXES_NOT_SUPPORTED, "1.2.840.10008.1.2.4.90"),
    ]


def test_command_set_decode_rejects_bad_input_and_response_is_valid_dicom() -> None:
    good = echo_rq(7)
    cmd = dimse.decode_command(good)
    assert (cmd.field, cmd.message_id, cmd.sop_class_uid, cmd.has_data_set) == (0x0030, 7, Verification, False)
    for bad in (good[:-1], good[:5], struct.pack("<HHI", 8, 0x18, 2) + b"ab", struct.pack("<HHI", 0, 0x100, 99)):
        with pytest.raises(dimse.CommandError):
            dimse.decode_command(bad)
    with pytest.raises(dimse.CommandError, match="CommandField"):
        dimse.decode_command(struct.pack("<HHI", 0, 0x110, 2) + b"\x01\x00")
    rsp = dimse.encode_response(dimse.C_STORE_RSP, 7, CTImageStorage, 0xC210, "1.2.3", error_comment="x" * 80)
    ds = read_dataset(io.BytesIO(rsp), True, True)
    assert ds.CommandGroupLength == len(rsp) - 12
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8001, 7, 0xC210)
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID) == (CTImageStorage, "1.2.3")
    assert ds.ErrorComment == "x" * 64


def test_part10_prefix_is_valid_file_meta(tmp_path: Path) -> None:
    sop = generate_uid()
    path = tmp_path / "x.dcm"
    body = dataset_bytes(_saved(make_instance(generate_uid(), generate_uid(), 1), tmp_path / "src.dcm").read_bytes())
    path.write_bytes(dimse.part10_prefix(CTImageStorage, sop, ExplicitVRLittleEndian) + body)
    ds = dcmread(path)
    assert ds.file_meta.MediaStorageSOPInstanceUID == sop and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.ImplementationClassUID == pdu.IMPLEMENTATION_CLASS_UID and ds.Rows == 64


def test_p_data_fragments_to_peer_max() -> None:
    out = pdu.encode_p_data(1, bytes(range(256)) * 4, True, max_pdu=100)
    pos, payload, flags = 0, b"", []
    while pos < len(out):
        kind, length = pdu.HEADER.unpack_from(out, pos)
        assert kind == pdu.P_DATA_TF and length <= 100
        item_len, ctx, control = pdu.PDV_HEADER.unpack_from(out, pos + 6)
        payload += out[pos + 12 : pos + 6 + 4 + item_len]
        flags.append(control)
        pos += 6 + length
    assert payload == bytes(range(256)) * 4 and flags[-1] == 3 and set(flags[:-1]) == {1}


# --- the protocol over raw sockets: bad input is aborted, the server lives on ------------------------------
@pytest.mark.integration
def test_p_data_before_association_is_aborted(scp: StorageSCP) -> None:
    with connect(scp) as sock:
        sock.sendall(p_data(pdv(1, echo_rq(), True)))
        assert expect_abort(sock)[1] == pdu.REASON_UNEXPECTED_PDU
        assert read_pdu(sock) == (0, b"")  # and closed
    assert echo_works(scp)


@pytest.mark.integration
def test_unknown_pdu_type_is_aborted(scp: StorageSCP) -> None:
    with associate(scp) as sock:
        sock.sendall(struct.pack(">BxI", 0x09, 4) + bytes(4))
        assert expect_abort(sock) == (pdu.SOURCE_PROVIDER, pdu.REASON_UNRECOGNIZED_PDU)
    assert echo_works(scp)


@pytest.mark.integration
def test_oversized_pdu_length_claims_are_aborted_without_reading(scp: StorageSCP) -> None:
    with connect(scp) as sock:  # an A-ASSOCIATE-RQ claiming ~4 GiB
        sock.sendall(struct.pack(">BxI", pdu.ASSOCIATE_RQ, 0xFFFFFFF0) + bytes(100))
        expect_abort(sock)
    with associate(scp) as sock:  # a P-DATA-TF beyond the maximum we announced (4096)
        sock.sendall(struct.pack(">BxI", pdu.P_DATA_TF, 1 << 20) + bytes(100))
        expect_abort(sock)
    assert echo_works(scp)


@pytest.mark.integration
def test_wrong_lengths_and_unknown_context_are_aborted(scp: StorageSCP) -> None:
    cases = [
        # PDV claims more than its PDU holds
        pdu.HEADER.pack(pdu.P_DATA_TF, 20) + pdu.PDV_HEADER.pack(500, 1, 3) + bytes(14),
        # PDV length below its own header
        pdu.HEADER.pack(pdu.P_DATA_TF, 6) + pdu.PDV_HEADER.pack(1, 1, 3),
        # fragment on a context that was never accepted
        p_data(pdv(9, echo_rq(), True)),
        # data set fragment with no command before it
        p_data(pdv(1, b"\x08\x00\x16\x00", False)),
        # a command set that does not decode
        p_data(pdv(1, b"\x00\x00\x00\x01\xff\xff\xff\xff", True)),
    ]
    for raw in cases:
        with associate(scp) as sock:
            sock.sendall(raw)
            assert expect_abort(sock)[0] == pdu.SOURCE_PROVIDER
    assert echo_works(scp)


@pytest.mark.integration
def test_truncated_pdu_then_disconnect_leaves_server_serving(scp: StorageSCP) -> None:
    with connect(scp) as sock:
        sock.sendall(assoc_rq(VERIFY_CX)[:40])  # the peer dies halfway through its request
    with associate(scp) as sock:
        sock.sendall(struct.pack(">BxI", pdu.P_DATA_TF, 1000) + bytes(10))
    time.sleep(0.2)
    assert echo_works(scp) and scp.active_associations() == 0


@pytest.mark.integration
def test_echo_release_and_peer_abort_over_raw_socket(scp: StorageSCP) -> None:
    with associate(scp) as sock:
        sock.sendall(p_data(pdv(1, echo_rq(42), True)))
        kind, body = read_pdu(sock)
        assert kind == pdu.P_DATA_TF and body[5] == 0x03  # one command PDV, last fragment
        rsp = read_dataset(io.BytesIO(body[6:]), True, True)
        assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (dimse.C_ECHO_RSP, 42, 0)
        sock.sendall(pdu.HEADER.pack(pdu.RELEASE_RQ, 4) + bytes(4))
        assert read_pdu(sock) == (pdu.RELEASE_RP, bytes(4))
    with associate(scp) as sock:
        sock.sendall(pdu.encode_abort(0, 0))
        assert read_pdu(sock) == (0, b"")


@pytest.mark.integration
def test_unknown_application_context_and_artim_timeout(tmp_path: Path) -> None:
    s = _scp(tmp_path, acse_timeout=0.3)
    try:
        with connect(s) as sock:
            sock.sendall(assoc_rq(VERIFY_CX, app="1.2.3.4.5"))
            kind, body = read_pdu(sock)
            assert kind == pdu.ASSOCIATE_RJ and body[1:] == b"\x01\x01\x02"
        with connect(s) as sock:  # says nothing: cut after acse_timeout
            t0 = time.monotonic()
            kind, _ = read_pdu(sock)
            assert kind in (0, pdu.ABORT) and time.monotonic() - t0 < 3
    finally:
        s.stop()


@pytest.mark.integration
def test_max_associations_rejected_transient_local_limit(tmp_path: Path) -> None:
    s = _scp(tmp_path, max_associations=1)
    try:
        with associate(s), connect(s) as second:
            second.sendall(assoc_rq(VERIFY_CX))
            kind, body = read_pdu(second)
            assert kind == pdu.ASSOCIATE_RJ and body[1:] == b"\x02\x03\x02"
        time.sleep(0.2)
        assert echo_works(s)  # the slot is free again
    finally:
        s.stop()


# --- interop: pynetdicom as the SCU -----------------------------------------------------------------
def _saved(ds, path: Path, ts: str = ExplicitVRLittleEndian) -> Path:
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(
        path,
        implicit_vr=ts == ImplicitVRLittleEndian,
        little_endian=ts != ExplicitVRBigEndian,
        enforce_file_format=True,
    )
    return path


def _corpus_file(ts: str) -> Path:
    for f in get_testdata_files():
        try:
            ds = dcmread(f, stop_before_pixels=True)
            if str(ds.file_meta.TransferSyntaxUID) == ts and "StudyInstanceUID" in ds and "PixelData" in dcmread(f):
                return Path(f)
        except Exception:
            continue
    raise AssertionError(f"no bundled pydicom file in {ts}")


@pytest.mark.integration
def test_pynetdicom_scu_echo_and_store_with_fragmentation_both_ways(tmp_path: Path) -> None:
    """Our max PDU 4096 makes the SCU fragment each data set; its max PDU 120 makes us fragment responses."""
    study = generate_uid()
    files = [
        _saved(make_instance(study, generate_uid(), i + 1, 96, 96), tmp_path / f"u{i}.dcm", ts)
        for i, ts in enumerate((ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian))
    ]
    files += [_corpus_file(JPEG_BASELINE), _corpus_file(RLE)]
    s = _scp(tmp_path, max_pdu=4096)
    ae = AE(ae_title="PYNETSCU")
    ae.maximum_pdu_size = 120
    ae.add_requested_context(Verification)
    metas = [dcmread(f, stop_before_pixels=True).file_meta for f in files]
    for m in metas:
        ae.add_requested_context(m.MediaStorageSOPClassUID, m.TransferSyntaxUID)
    _config.STORE_SEND_CHUNKED_DATASET = True  # send each file's data set bytes as they are
    try:
        assoc = ae.associate("127.0.0.1", s.address[1], ae_title="APPLIANCE")
        assert assoc.is_established and assoc.acceptor.maximum_length == 4096
        assert int(assoc.send_c_echo().Status) == 0
        statuses = [int(assoc.send_c_store(f).Status) for f in files]
        assoc.release()
        assert statuses == [0] * len(files)
        rows = s.store.query("SELECT * FROM instances ORDER BY id")
        assert [r["transfer_syntax"] for r in rows] == [str(m.TransferSyntaxUID) for m in metas]
        for f, r in zip(files, rows, strict=True):
            stored = s.spool.abspath(r["path"]).read_bytes()
            assert dataset_bytes(stored) == dataset_bytes(f.read_bytes())  # byte-identical data set
            assert dcmread(s.spool.abspath(r["path"])).SOPInstanceUID == r["sop_instance_uid"]
        # a failure status reaches the SCU with its error comment, fragmented to 120-byte PDUs too
        body = dataset_bytes(files[0].read_bytes())
        bad = tmp_path / "bad.dcm"  # the command's SOP Instance UID differs from the data set's: refused
        bad.write_bytes(part10(CTImageStorage, generate_uid(), ExplicitVRLittleEndian, body))
        assoc = ae.associate("127.0.0.1", s.address[1], ae_title="APPLIANCE")
        rsp = assoc.send_c_store(bad)
        assoc.release()
        assert int(rsp.Status) == 0xC212 and "differs" in str(rsp.ErrorComment)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        s.stop()


def _store_rq(sop_uid: str, message_id: int = 1) -> bytes:
    def ui(v: str) -> bytes:
        return v.encode() + (b"\0" if len(v) % 2 else b"")

    elems = [
        (0x0002, ui(CTImageStorage)),
        (0x0100, struct.pack("<H", dimse.C_STORE_RQ)),
        (0x0110, struct.pack("<H", message_id)),
        (0x0700, struct.pack("<H", 0)),
        (0x0800, struct.pack("<H", 0x0000)),
        (0x1000, ui(sop_uid)),
    ]
    rest = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elems)
    return struct.pack("<HHII", 0, 0, 4, len(rest)) + rest


@pytest.mark.integration
def test_partial_data_set_cut_off_is_never_recorded(tmp_path: Path) -> None:
    """A C-STORE whose data set stops halfway (connection dropped, or A-ABORT) leaves no row and no file;
    the same instance sent whole afterwards is stored and acknowledged."""
    ds = make_instance(generate_uid(), generate_uid(), 1, 128, 128)
    body = dataset_bytes(_saved(ds, tmp_path / "i.dcm").read_bytes())
    cx = [(1, CTImageStorage, [ExplicitVRLittleEndian])]
    s = _scp(tmp_path, max_pdu=4096)
    try:
        for ending in (b"", pdu.encode_abort(0, 0)):
            with associate(s, contexts=cx) as sock:
                sock.sendall(p_data(pdv(1, _store_rq(str(ds.SOPInstanceUID)), True)))
                for i in range(0, len(body) // 2, 4000):
                    sock.sendall(p_data(pdv(1, body[i : i + 4000], False, last=False)))
                sock.sendall(ending)
            time.sleep(0.2)
            assert s.store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0
            assert not spool_data_files(s.spool.root)
        with associate(s, contexts=cx) as sock:
            sock.sendall(p_data(pdv(1, _store_rq(str(ds.SOPInstanceUID), 2), True)))
            chunks = [body[i : i + 4000] for i in range(0, len(body), 4000)]
            for i, chunk in enumerate(chunks):
                sock.sendall(p_data(pdv(1, chunk, False, last=i == len(chunks) - 1)))
            kind, rsp = read_pdu(sock)
            assert kind == pdu.P_DATA_TF
            assert read_dataset(io.BytesIO(rsp[6:]), True, True).Status == 0
        assert s.store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 1
    finally:
        s.stop()


# --- streaming: the spool file is written while the data set arrives ------------------------------------
def _spool_files(s: StorageSCP) -> list[Path]:
    return spool_data_files(s.spool.root)


def _store_fragmented(sock: socket.socket, sop_uid: str, body: bytes, message_id: int) -> int:
    """One C-STORE with its data set in 4000-byte fragments; the response status."""
    sock.sendall(p_data(pdv(1, _store_rq(sop_uid, message_id), True)))
    chunks = [body[i : i + 4000] for i in range(0, len(body), 4000)]
    for i, chunk in enumerate(chunks):
        sock.sendall(p_data(pdv(1, chunk, False, last=i == len(chunks) - 1)))
    kind, rsp = read_pdu(sock)
    assert kind == pdu.P_DATA_TF
    return int(read_dataset(io.BytesIO(rsp[6:]), True, True).Status)


def _wait(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.integration
def test_streamed_file_of_an_instance_cut_off_is_removed(tmp_path: Path) -> None:
    """The spool file exists while the data set streams in (header decided from the first fragments);
    when the association drops or is aborted mid-instance the file goes and no row is written."""
    ds = make_instance(generate_uid(), generate_uid(), 1, 256, 256)
    body = dataset_bytes(_saved(ds, tmp_path / "i.dcm").read_bytes())
    sop = str(ds.SOPInstanceUID)
    cx = [(1, CTImageStorage, [ExplicitVRLittleEndian])]
    s = _scp(tmp_path / "scp", max_pdu=4096)
    try:
        for ending in (b"", pdu.encode_abort(0, 0)):
            with associate(s, contexts=cx) as sock:
                sock.sendall(p_data(pdv(1, _store_rq(sop), True)))
                for i in range(0, len(body) // 2, 4000):
                    sock.sendall(p_data(pdv(1, body[i : i + 4000], False, last=False)))
                assert _wait(lambda: len(_spool_files(s)) == 1), "the file is not written while streaming"
                assert _spool_files(s)[0].read_bytes()[128:132] == b"DICM"  # this instance's first bytes
                sock.sendall(ending)
            assert _wait(lambda: not _spool_files(s)), "partial spool file left behind"
            assert s.store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0
        with associate(s, contexts=cx) as sock:
            assert _store_fragmented(sock, sop, body, 2) == 0
        [row] = s.store.query("SELECT * FROM instances")
        assert _spool_files(s) == [s.spool.abspath(row["path"])]
        assert dataset_bytes(s.spool.abspath(row["path"]).read_bytes()) == body
    finally:
        s.stop()


@pytest.mark.integration
def test_streamed_duplicate_leaves_no_extra_file_changed_bytes_kept(tmp_path: Path) -> None:
    """Same SOP UID + same bytes streamed again: Success, no new row, the copy just written is removed.
    Different bytes under the same UID: a second row and file. Pixel data cut short (noticed only at
    the last fragment, after the file was opened) is refused 0xC210 and leaves nothing."""
    ds = make_instance(generate_uid(), generate_uid(), 1, 128, 128)
    body = dataset_bytes(_saved(ds, tmp_path / "a.dcm").read_bytes())
    sop = str(ds.SOPInstanceUID)
    changed = body[:-2] + bytes([body[-2] ^ 0xFF, body[-1]])
    truncated_uid = generate_uid()
    ds.SOPInstanceUID = truncated_uid
    ds.file_meta.MediaStorageSOPInstanceUID = truncated_uid
    short = dataset_bytes(_saved(ds, tmp_path / "t.dcm").read_bytes())[:-1000]
    ds.SOPInstanceUID = padded_uid = generate_uid()
    ds.DataSetTrailingPadding = b"\0" * 64  # an element after Pixel Data: the tail is parsed at the end
    padded = dataset_bytes(_saved(ds, tmp_path / "p.dcm").read_bytes())
    cx = [(1, CTImageStorage, [ExplicitVRLittleEndian])]
    s = _scp(tmp_path / "scp", max_pdu=4096)
    try:
        with associate(s, contexts=cx) as sock:
            assert [_store_fragmented(sock, sop, body, i) for i in (1, 2, 3)] == [0, 0, 0]
            assert len(_spool_files(s)) == 1
            assert _store_fragmented(sock, sop, changed, 4) == 0
            assert _store_fragmented(sock, truncated_uid, short, 5) == 0xC210
            assert _store_fragmented(sock, padded_uid, padded, 6) == 0
        rows = s.store.query("SELECT * FROM instances ORDER BY id")
        assert [r["sop_instance_uid"] for r in rows] == [sop, sop, padded_uid]
        assert "sop_uid_reused" in (rows[1]["flags"] or "")
        assert _spool_files(s) == sorted(s.spool.abspath(r["path"]) for r in rows)
        for r, sent in zip(rows, (body, changed, padded), strict=True):
            data = s.spool.abspath(r["path"]).read_bytes()
            assert dataset_bytes(data) == sent and hashlib.sha256(data).hexdigest() == r["sha256"]
    finally:
        s.stop()


# --- a disk that fills up while instances arrive -------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MiB filesystem (tmpfs), so writes fail with ENOSPC as on a full disk."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.integration
def test_disk_full_mid_instance_refuses_it_and_loses_nothing_acked(tmp_path: Path, small_disk: Path) -> None:
    """The disk fills while data sets stream in (the free-space floor is off): the instances that fit
    are acknowledged and intact; the ones that hit ENOSPC get 0xA701 with nothing of them left
    behind; once there is room again the modality's resend stores them, each exactly once."""
    files = write_series(tmp_path / "series", 8, rows=512, cols=512)  # 8 x 525 kB into 3 MiB
    sop_of = {str(f): str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    s = StorageSCP(DicomConfig(port=0, min_free_bytes=0), Store(tmp_path / "state.db"), Spool(small_disk / "spool"))
    s.start()
    try:
        answers = storescu_results(storescu(s.address[1], files).stdout)
        acked = [f for f, a in answers.items() if a == "Success"]
        refused = [f for f, a in answers.items() if a != "Success"]
        assert len(answers) == len(files), answers  # every instance answered: the association went on
        assert acked and refused, answers
        assert all("OutOfResources" in answers[f] for f in refused)  # 0xA701: could not write
        rows = {r["sop_instance_uid"]: r for r in s.store.query("SELECT * FROM instances")}
        assert set(rows) == {sop_of[f] for f in acked}
        for f in acked:
            stored = s.spool.abspath(rows[sop_of[f]]["path"]).read_bytes()
            assert dataset_bytes(stored) == dataset_bytes(Path(f).read_bytes())
        assert spool_data_files(s.spool.root) == sorted(s.spool.abspath(r["path"]) for r in rows.values())
        # room again (the technician cleared space): the resend completes the series, nothing twice
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
        again = storescu_results(storescu(s.address[1], files).stdout)
        assert set(again.values()) == {"Success"}, again
        assert sorted(r["sop_instance_uid"] for r in s.store.query("SELECT * FROM instances")) == sorted(
            sop_of.values()
        )
    finally:
        s.stop()


@pytest.mark.integration
def test_concurrent_modalities_each_instance_once_and_intact(tmp_path: Path) -> None:
    """Four modalities send at once (one re-sends another's series at the same time), with a spool
    reserve far smaller than the burst (refilled meanwhile): every instance is acknowledged, recorded
    once, intact, and no file without a row is left."""
    from concurrent.futures import ThreadPoolExecutor

    series = [write_series(tmp_path / f"m{i}", 40, rows=128, cols=128) for i in range(3)]
    senders = [*series, series[0]]  # the fourth sends the first one's instances concurrently
    s = StorageSCP(
        DicomConfig(port=0, min_free_bytes=0, max_associations=8),
        Store(tmp_path / "state.db"),
        Spool(tmp_path / "spool", reserve_size=4),
    )
    s.start()
    try:
        with ThreadPoolExecutor(len(senders)) as pool:
            outs = list(pool.map(lambda fs: storescu(s.address[1], fs, aet="MOD").stdout, senders))
        for files, out in zip(senders, outs, strict=True):
            answers = storescu_results(out)
            assert [answers.get(str(f)) for f in files] == ["Success"] * len(files), out[-1500:]
        rows = s.store.query("SELECT sop_instance_uid, path, size, sha256 FROM instances")
        sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for fs in series for f in fs}
        assert sorted(r["sop_instance_uid"] for r in rows) == sorted(sent)  # each exactly once
        for r in rows:
            stored = s.spool.abspath(r["path"]).read_bytes()
            assert len(stored) == r["size"] and hashlib.sha256(stored).hexdigest() == r["sha256"]
            assert dataset_bytes(stored) == dataset_bytes(sent[r["sop_instance_uid"]].read_bytes())
        assert spool_data_files(s.spool.root) == sorted(s.spool.abspath(r["path"]) for r in rows)
    finally:
        s.stop()
