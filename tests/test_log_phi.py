"""Logs: no PHI at INFO (real UIDs and names are log pseudonyms), control characters escaped: a value from the
network never forges a log line. Checked on the formatter and on the daemon's real output for a hostile study."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pydicom
import pytest

from appliance.core import logs
from engines.reference import phantoms
from testsupport.common import wait_until
from testsupport.daemon import running_daemon
from testsupport.dcmtk import storescu

UID = "1.2.826.0.1.3680043.8.498.77123"
NAME = "EVIL^\n2026-01-01T00:00:00.000Z INFO    appliance: forged\x1b[2J\x1b[31m\u2028RED"


def _emit(fmt: str, level: int = logging.INFO, **fields: object) -> str:
    buf = io.StringIO()
    logs.configure("DEBUG", fmt, buf)
    try:
        logs.get_logger("t").log(level, "study %s \x1b[1mready\r\n", "x", **fields)
        try:
            raise ValueError(f"bad value {UID}\nINFO forged traceback line")
        except ValueError:
            logs.get_logger("t").exception("failed", study_uid=UID)
    finally:
        logs.configure("INFO", "text")
    return buf.getvalue()


@pytest.mark.unit
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_info_lines_carry_no_uid_or_name_and_no_raw_control_characters(fmt: str) -> None:
    out = _emit(fmt, study_uid=UID, patient_name=NAME, reason=f"SOP {UID} differs", ts="1.2.840.10008.1.2.1")
    assert UID not in out and "EVIL" not in out and "forged\x1b" not in out
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f\u2028]", out)  # no control character but the line ends
    assert "1.2.840.10008.1.2.1" in out  # the standard's own UIDs are not PHI
    lines = out.splitlines()
    if fmt == "json":
        docs = [json.loads(line) for line in lines]
        assert len(docs) == 2 and docs[0]["study_uid"].startswith("phi~") and "\\x1b" in docs[0]["msg"]
        assert docs[0]["reason"].startswith("SOP phi~") and docs[1]["study_uid"] == docs[0]["study_uid"]
    else:
        stamped = [ln for ln in lines if re.match(r"\d{4}-\d\d-\d\dT", ln)]
        assert len(stamped) == 2 and all(ln.startswith("| ") for ln in lines if ln not in stamped)
        assert "study x \\x1b[1mready\\r\\n" in stamped[0]


PATIENT_ID = "PID-4471-XYZ"


@pytest.mark.unit
@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL])
def test_no_identifier_at_any_level_even_with_the_local_level_at_debug(fmt: str, level: int) -> None:
    """Issue 19: the local ``log.level = DEBUG`` (``_emit`` configures DEBUG) no longer writes real identifiers:
    UIDs (in fields, the message and a traceback), names and patient IDs are pseudonyms at every level."""
    buf = io.StringIO()
    logs.configure("DEBUG", fmt, buf)
    try:
        log = logs.get_logger("t")
        log.log(level, f"parsed {UID}", study_uid=UID, patient_name=NAME, patient_id=PATIENT_ID)
        try:
            raise ValueError(f"bad value {UID}")
        except ValueError:
            log.log(level, "failed", exc_info=True, sop_uid=UID, name="DOE^JANE")
    finally:
        logs.configure("INFO", "text")
    out = buf.getvalue()
    assert out.count("phi~") >= 6  # each identifier written, as a pseudonym
    assert UID not in out and "EVIL" not in out and "DOE" not in out
    assert PATIENT_ID not in out and "patient_id" in out
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f\u2028]", out)


@pytest.mark.integration
def test_daemon_logs_no_uid_or_name_of_a_hostile_study_at_info(tmp_path: Path, home: Path) -> None:
    src = Path(phantoms.chest_study(tmp_path / "in", seed=9)["files"][0])
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = UID
    ds.PatientName = NAME
    ds.AccessionNumber = "ACC\x1b[31m42"
    hostile = tmp_path / "hostile.dcm"
    ds.save_as(hostile, enforce_file_format=True)
    env = {"APPLIANCE_PIPELINE__ENABLED": "true", "APPLIANCE_ENGINES__INSTALL_REFERENCE_BUNDLES": "true"}
    with running_daemon(home, env=env) as d:
        assert storescu(d.port, [hostile]).returncode == 0
        wait_until(lambda: d.studies("inferred"), timeout=120, what="study inferred")
        out = d.logs()
    assert "results stored" in out and "study_id=" in out
    assert UID not in out and str(ds.SOPInstanceUID) not in out and "EVIL" not in out and "ACC" not in out
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f\u2028]", out)


UUID_UID = "2.25.329800735698586629295641978511506172918"  # a UUID-derived UID (PS3.5 B.2, ITU-T X.667): 3 parts


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "uid"),
    [
        (f"stored {UUID_UID}", UUID_UID),  # UUID-derived UIDs have only three components
        (f"[Errno 2] No such file: '/var/lib/a/results/x/sc-{UID}.dcm'", UID),  # a file named after a UID
        (f"[Errno 2] No such file: '/var/lib/a/results/x/sc-{UUID_UID}.dcm'", UUID_UID),
        (f"series_{UID} failed", UID),  # joined to a word
        (f"object sr.{UID}", UID),  # after a dot that is not part of a number
    ],
)
def test_every_uid_shape_is_pseudonymised_at_info(text: str, uid: str) -> None:
    buf = io.StringIO()
    logs.configure("INFO", "text", buf)
    try:
        logs.get_logger("t").warning(text, path=text)
        try:
            raise FileNotFoundError(text)
        except FileNotFoundError:
            logs.get_logger("t").exception("failed")
    finally:
        logs.configure("INFO", "text")
    out = buf.getvalue()
    assert uid not in out and out.count("phi~") >= 3, out


@pytest.mark.unit
@pytest.mark.parametrize(
    "text",
    ["version 1.10.0", "requests 2.25.1", "peer 192.168.100.200:104", "1.2.840.10008.5.1.4.1.1.7", "took 3.25 s"],
)
def test_versions_addresses_and_standard_uids_are_not_pseudonymised(text: str) -> None:
    assert logs.clean_text(text, True) == text


@pytest.mark.unit
def test_debug_turned_on_through_the_twin_still_pseudonymises() -> None:
    """Whoever writes the device twin may raise the log level (``desired.log_level``), but only the technician's
    own configuration (``log.level = DEBUG``) writes real identifiers: the twin must not put PHI in journald."""
    from types import SimpleNamespace

    from appliance.cloud.overlay import CloudOverlay

    buf = io.StringIO()
    logs.configure("INFO", "text", buf)
    try:
        CloudOverlay._apply_log_level(SimpleNamespace(log_level="DEBUG"))  # type: ignore[arg-type]
        logs.get_logger("t").debug(f"parsed {UID}", study_uid=UID, patient_name="DOE^JANE")
    finally:
        logs.configure("INFO", "text")
    out = buf.getvalue()
    assert "parsed phi~" in out  # the DEBUG line is written (the twin's level is in force) ...
    assert UID not in out and "DOE" not in out  # ... without the real values
