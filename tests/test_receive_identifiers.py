"""Input strings that become identifiers (issue 16, item 4): a Study, Series or SOP Instance UID that is not a
valid UID (PS3.5 9.1, with the UI padding of PS3.5 6.2) is refused at receive with a DIMSE failure status, logged
without the UID, and leaves nothing in the spool or state.db; a valid one in the same association is stored.

The rules come from the standard, not from the code: PS3.5 9.1 (components of digits separated by '.', no leading
zero unless the component is "0", at most 64 characters) and PS3.5 6.2 (UI: one trailing NUL pads an odd length).
"""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

from appliance.app.infer_offline import run_offline
from appliance.core.config import load_settings
from appliance.core.safe_names import uid_fault, unpadded_uid
from appliance.ingest.header import STATUS_INVALID_UID, MalformedInstance, parse_header
from testsupport.daemon import running_daemon
from testsupport.dcmtk import STORESCU, dcmtk_env, have_dcmtk
from testsupport.dicom import make_instance, spool_data_files

# (attribute, value as written in the element, raw bytes included) -> refused; each breaks one rule
BAD = {
    "leading_zero": ("StudyInstanceUID", "1.2.826.0.1.3680043.10.1138.07"),
    "letters": ("StudyInstanceUID", "1.2.826.0.1.3680043.10.1138.7a"),
    "65_chars": ("StudyInstanceUID", "1.2." + "9" * 61),
    "empty_component": ("StudyInstanceUID", "1.2.826..1.3680043.10.1138"),
    "trailing_dot": ("StudyInstanceUID", "1.2.826.0.1.3680043.10.1138."),
    "leading_dot": ("StudyInstanceUID", ".1.2.826.0.1.3680043.10.1138"),
    "series_leading_zero": ("SeriesInstanceUID", "1.2.826.0.1.3680043.10.1138.0042"),
    "sop_letters": ("SOPInstanceUID", "1.2.826.0.1.3680043.10.1138.x9"),
}
# whitespace beyond PS3.5 6.2's padding: storescu (dcmtk) strips a UI value's leading and trailing whitespace
# when it sends a file, so these go through pynetdicom, which sends the file's data set bytes unchanged
BAD_PADDING = {
    "leading_space": ("StudyInstanceUID", " 1.2.826.0.1.3680043.10.1138"),
    "two_nul_padding": ("StudyInstanceUID", "1.2.826.0.1.3680043.10.11389\x00\x00"),
    "series_two_nul_padding": ("SeriesInstanceUID", "1.2.826.0.1.3680043.10.1138.99\x00\x00"),
}
# a valid UID, padded as PS3.5 6.2 says (NUL) or as many writers do (SPACE): stored, without the padding
GOOD = {
    "plain": ("StudyInstanceUID", "1.2.826.0.1.3680043.10.1138.4242"),
    "nul_padded": ("StudyInstanceUID", "1.2.826.0.1.3680043.10.1138.42421\x00"),
    "space_padded": ("StudyInstanceUID", "1.2.826.0.1.3680043.10.1138.42422 "),
}


def _placeholder(length: int) -> str:
    """A valid UID of exactly ``length`` characters (even), unique enough to be found in the file's bytes."""
    assert length >= 12
    return "9.8.7." + "6" * (length - 6)


def write_case(path: Path, attribute: str, raw_value: str, number: int) -> Path:
    """A small CT instance whose ``attribute`` holds exactly ``raw_value`` (padding included) in the file.

    pydicom normalises UI values when it writes them, so the file is written with a valid placeholder of the same
    even length and the value's bytes replace the placeholder's (the element length stays right)."""
    ds = make_instance(generate_uid(), generate_uid(), number)
    length = len(raw_value) + len(raw_value) % 2
    value = raw_value + "\x00" * (len(raw_value) % 2)
    placeholder = _placeholder(length)
    setattr(ds, attribute, placeholder)
    if attribute == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = placeholder
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    assert data.count(placeholder.encode()) == (2 if attribute == "SOPInstanceUID" else 1)
    path.write_bytes(data.replace(placeholder.encode(), value.encode("latin-1")))
    return path


# --------------------------------------------------------------------------------------------------
# The rule itself


@pytest.mark.parametrize(
    "value",
    ["0", "1.2", "0.0", "1.2.840.10008.5.1.4.1.1.1", "2.25.329800735698586629295641978511506172918", "1" * 64],
)
def test_valid_uids(value: str) -> None:
    assert uid_fault(value) is None and unpadded_uid(value) == value


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("", "empty"),
        ("1.02", "leading zero"),
        ("00.1", "leading zero"),
        ("1.2a", "other than 0-9"),
        ("1.2.3\n", "other than 0-9"),  # pydicom's UID.is_valid accepts this one
        ("1.2\\1.3", "other than 0-9"),  # two values
        ("１.2", "other than 0-9"),  # a full-width digit: str.isdigit() would accept it
        ("1" * 65, "more than 64"),
        ("1..2", "empty component"),
        ("1.2.", "empty component"),
        (".1.2", "empty component"),
    ],
)
def test_invalid_uids_name_the_rule_not_the_value(value: str, rule: str) -> None:
    fault = uid_fault(value)
    assert fault is not None and rule in fault
    assert value not in fault or not value
    with pytest.raises(ValueError, match=re.escape(fault)):
        unpadded_uid(value)


@pytest.mark.parametrize(
    ("value", "uid"),
    [("1.2.3\x00", "1.2.3"), ("1.2.3 ", "1.2.3"), ("1.23", "1.23"), ("1" * 63 + "\x00", "1" * 63)],
)
def test_ui_padding_removed(value: str, uid: str) -> None:
    assert unpadded_uid(value) == uid


@pytest.mark.parametrize("value", ["1.2.3\x00\x00\x00", "1.23\x00", "1.2.3 \x00", "1" * 64 + "\x00", "\x00"])
def test_ui_padding_beyond_ps3_5_6_2_is_refused(value: str) -> None:
    with pytest.raises(ValueError):
        unpadded_uid(value)


def test_header_refuses_each_bad_uid_with_c214_and_no_uid_in_the_reason(tmp_path: Path) -> None:
    for i, (name, (attribute, value)) in enumerate({**BAD, **BAD_PADDING}.items()):
        f = write_case(tmp_path / f"{name}.dcm", attribute, value, i + 1)
        ds = dcmread(f, stop_before_pixels=True)
        data = f.read_bytes()
        cls, sop = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
        with pytest.raises(MalformedInstance) as ei:
            parse_header(data, cls, sop, str(ds.file_meta.TransferSyntaxUID))
        assert ei.value.status == STATUS_INVALID_UID == 0xC214, name
        assert attribute in ei.value.reason, name
        assert value.strip("\x00 ") not in ei.value.reason, name
    for i, (name, (attribute, value)) in enumerate(GOOD.items()):
        f = write_case(tmp_path / f"{name}.dcm", attribute, value, i + 1)
        ds = dcmread(f, stop_before_pixels=True)
        header = parse_header(f.read_bytes(), str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.840.10008.1.2.1")
        assert header.study_uid == value.rstrip("\x00 "), name


def test_command_and_data_set_uid_mismatch_is_refused_without_the_uids_in_the_reason() -> None:
    ds = make_instance(generate_uid(), generate_uid(), 1)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    other = generate_uid()
    with pytest.raises(MalformedInstance) as ei:
        parse_header(data, str(ds.SOPClassUID), other, "1.2.840.10008.1.2.1")
    assert ei.value.status == 0xC212
    assert other not in ei.value.reason and str(ds.SOPInstanceUID) not in ei.value.reason


def test_infer_refuses_a_file_with_an_invalid_uid(tmp_path: Path) -> None:
    """``appliance infer`` reads files, not C-STOREs: the same rule keeps an invalid UID out of its results."""
    attribute, value = BAD["trailing_dot"]
    (tmp_path / "in").mkdir()
    f = write_case(tmp_path / "in" / "bad.dcm", attribute, value, 1)
    settings = load_settings(None, {"state_dir": tmp_path / "box"})

    class NoBundles:
        def active(self) -> list:
            return []

        def close(self) -> None:
            pass

    out = run_offline(settings, [f], tmp_path / "out", bundles=NoBundles())  # type: ignore[arg-type]
    assert out["errors"] and out["errors"][0]["path"] == str(f)
    assert "StudyInstanceUID is not a valid UID" in out["errors"][0]["error"]
    assert value.strip() not in str(out)


# --------------------------------------------------------------------------------------------------
# Through the real receiver, dcmtk's storescu as the modality


def _storescu_statuses(port: int, files: list[Path]) -> dict[str, tuple[int, str]]:
    """storescu -d over ``files`` in one association: file -> (DIMSE status, storescu's words for it, then the
    Error Comment when one came back)."""
    cmd = [STORESCU, "-d", "-nh", "-aet", "STORESCU", "-aec", "APPLIANCE", "127.0.0.1", str(port), *map(str, files)]
    out = subprocess.run(
        cmd, env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120
    ).stdout
    answers: dict[str, tuple[int, str]] = {}
    current = None
    for line in out.splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
        m = re.search(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4}):?\s*(.*)$", line)
        if m and current is not None:
            answers[current] = (int(m.group(1), 16), m.group(2).strip())
        m = re.search(r"ErrorComment", line)
        if m and current in answers:
            answers[current] = (answers[current][0], answers[current][1] + " | " + line)
    return answers


def _send_unchanged(port: int, files: list[Path]) -> list[int]:
    """C-STORE each file's data set bytes exactly as they are in the file (pynetdicom); the statuses."""
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="APPLIANCE")
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True  # a path is sent as raw bytes, not decoded and re-encoded
    try:
        return [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()


@pytest.mark.integration
@pytest.mark.skipif(not have_dcmtk(), reason="dcmtk (storescu) not installed")
def test_storescu_bad_uids_refused_good_ones_stored_in_one_association(home: Path, tmp_path: Path) -> None:
    bad = [write_case(tmp_path / f"bad_{n}.dcm", a, v, i + 1) for i, (n, (a, v)) in enumerate(BAD.items())]
    good = [write_case(tmp_path / f"good_{n}.dcm", a, v, 20 + i) for i, (n, (a, v)) in enumerate(GOOD.items())]
    files = [good[0], *bad[:5], good[1], *bad[5:], good[2]]  # good ones before, between and after the bad ones
    with running_daemon(home, env={"APPLIANCE_DICOM__QUIET_SECONDS": "0.5"}) as d:
        answers = _storescu_statuses(d.port, files)
        for f in bad:  # PS3.4 Table B.2-1: Cxxx is "Error: Cannot understand"; the comment says what was wrong
            status, words = answers[str(f)]
            assert status == 0xC214 and "Cannot understand" in words, (f.name, answers)
            assert "not a valid UID (PS3.5 9.1)" in words, (f.name, words)
        for f in good:
            assert answers[str(f)][0] == 0x0000, (f.name, answers)
        padded = [write_case(tmp_path / f"{n}.dcm", a, v, 40 + i) for i, (n, (a, v)) in enumerate(BAD_PADDING.items())]
        assert _send_unchanged(d.port, padded) == [0xC214] * len(padded)
        bad += padded
        rows = d.instances()
        stored_sops = {r["sop_instance_uid"] for r in rows}
        assert stored_sops == {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in good}
        studies = {r["study_uid"] for r in d.studies()}
        assert studies == {value.rstrip("\x00 ") for _, value in GOOD.values()}  # padding removed, nothing else
        assert len(spool_data_files(home / "spool")) == len(good)  # nothing of the refused ones in the spool
        logs = d.logs()
        assert logs.count("instance refused: malformed") == len(bad)
        assert logs.count("is not a valid UID (PS3.5 9.1)") == len(bad)
        for _, value in BAD.values():
            assert value.strip("\x00 ") not in logs  # the UID never reaches the log (PHI rules)
        assert d.alive()
