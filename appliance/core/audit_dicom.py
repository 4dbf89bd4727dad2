"""Audit trail entries as DICOM Audit Messages (PS3.15 Annex A.5, the XML schema derived from RFC 3881).

One entry becomes one ``<AuditMessage>``: ``EventIdentification`` (EventID from DCID 400 "Audit Event
ID", EventTypeCode from DCID 401 where one fits, plus the appliance's own event name under the private
coding scheme ``99APPLIANCE``), one ``ActiveParticipant`` for the requestor (the entry's actor, with its
IP as NetworkAccessPointID type 2) and one for the appliance application (RoleIDCode 110150
"Application"), ``AuditSourceIdentification`` (AuditSourceTypeCode 4, "Application Server process"),
and ``ParticipantObjectIdentification`` for the entry's subject (a study, user or model bundle) and for
the trail entry itself (its seq, hash and detail as ParticipantObjectDetail, base64 per the schema).

Coded values use the current schema's attributes ``csd-code``, ``codeSystemName`` and ``originalText``.
Outcome: ``success`` -> EventOutcomeIndicator 0, ``failure`` -> 4 (minor failure; the box's failures are
refused requests or failed transfers, not serious failures). EventDateTime is the entry's UTC time.

Deviations, said plainly: the trail holds no PHI, so messages for DICOM Instances Accessed/Transferred
carry no Patient participant object (A.5.3 asks for one); the study is identified by its Study Instance
UID when the subject is one, else by the appliance's study id under ``99APPLIANCE``.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from appliance.core.audit import FAILURE, AuditEntry, AuditEvent

DCM = "DCM"
PRIVATE = "99APPLIANCE"


@dataclass(frozen=True)
class Code:
    """A coded value (csd-code, codeSystemName, originalText)."""

    code: str
    scheme: str
    meaning: str


# DCID 400 Audit Event ID
APPLICATION_ACTIVITY = Code("110100", DCM, "Application Activity")
INSTANCES_ACCESSED = Code("110103", DCM, "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", DCM, "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", DCM, "DICOM Study Deleted")
SECURITY_ALERT = Code("110113", DCM, "Security Alert")
USER_AUTHENTICATION = Code("110114", DCM, "User Authentication")
# DCID 401 Audit Event Type Code
APPLICATION_START = Code("110120", DCM, "Application Start")
APPLICATION_STOP = Code("110121", DCM, "Application Stop")
LOGIN = Code("110122", DCM, "Login")
LOGOUT = Code("110123", DCM, "Logout")
SECURITY_CONFIGURATION = Code("110129", DCM, "Security Configuration")
SOFTWARE_CONFIGURATION = Code("110131", DCM, "Software Configuration")
SECURITY_ROLES_CHANGED = Code("110136", DCM, "Security Roles Changed")
USER_SECURITY_ATTRIBUTES_CHANGED = Code("110137", DCM, "User Security Attributes Changed")
# DCID 402 Audit Active Participant Role ID Code
ROLE_APPLICATION = Code("110150", DCM, "Application")
ROLE_DESTINATION = Code("110152", DCM, "Destination Role ID")
ROLE_SOURCE = Code("110153", DCM, "Source Role ID")
# DCID 404 Audit Participant Object ID Type Code, RFC 3881 codes
STUDY_INSTANCE_UID = Code("110180", DCM, "Study Instance UID")
USER_IDENTIFIER = Code("11", "RFC-3881", "User Identifier")
APPLIANCE_STUDY_ID = Code("study-id", PRIVATE, "Appliance study identifier")
MODEL_BUNDLE = Code("model-bundle", PRIVATE, "AI model bundle id@version")
AUDIT_ENTRY = Code("audit-entry", PRIVATE, "Appliance audit trail entry")
OTHER_SUBJECT = Code("subject", PRIVATE, "Appliance audit subject")
SOURCE_APPLICATION_SERVER = Code("4", DCM, "Application Server process tier in a multi-tier system")


@dataclass(frozen=True)
class EventMapping:
    """How one :class:`AuditEvent` is expressed: EventID, EventTypeCode (or None), EventActionCode and
    the kind of its subject (``study``, ``user``, ``bundle`` or ``other``)."""

    event_id: Code
    type_code: Code | None
    action: str
    subject_kind: str


EVENT_MAPPING: dict[AuditEvent, EventMapping] = {
    AuditEvent.LOGIN: EventMapping(USER_AUTHENTICATION, LOGIN, "E", "user"),
    AuditEvent.LOGIN_FAILED: EventMapping(USER_AUTHENTICATION, LOGIN, "E", "user"),
    AuditEvent.LOGOUT: EventMapping(USER_AUTHENTICATION, LOGOUT, "E", "user"),
    AuditEvent.LOCKOUT: EventMapping(SECURITY_ALERT, USER_SECURITY_ATTRIBUTES_CHANGED, "E", "user"),
    AuditEvent.STUDY_VIEWED: EventMapping(INSTANCES_ACCESSED, None, "R", "study"),
    AuditEvent.STUDY_RETRY: EventMapping(INSTANCES_ACCESSED, None, "U", "study"),
    AuditEvent.STUDY_RESEND: EventMapping(INSTANCES_TRANSFERRED, None, "R", "study"),
    AuditEvent.FEEDBACK: EventMapping(INSTANCES_ACCESSED, None, "C", "study"),  # a radiologist's verdict added
    AuditEvent.EXPORT: EventMapping(INSTANCES_TRANSFERRED, None, "R", "study"),
    AuditEvent.PURGE: EventMapping(STUDY_DELETED, None, "D", "other"),
    AuditEvent.CONFIG_CHANGED: EventMapping(SECURITY_ALERT, SOFTWARE_CONFIGURATION, "E", "other"),
    AuditEvent.USER_ADDED: EventMapping(SECURITY_ALERT, SECURITY_ROLES_CHANGED, "E", "user"),
    AuditEvent.USER_CHANGED: EventMapping(SECURITY_ALERT, USER_SECURITY_ATTRIBUTES_CHANGED, "E", "user"),
    AuditEvent.MODEL_INSTALLED: EventMapping(SECURITY_ALERT, SOFTWARE_CONFIGURATION, "E", "bundle"),
    AuditEvent.MODEL_ACTIVATED: EventMapping(SECURITY_ALERT, SOFTWARE_CONFIGURATION, "E", "bundle"),
    AuditEvent.MODEL_ROLLED_BACK: EventMapping(SECURITY_ALERT, SOFTWARE_CONFIGURATION, "E", "bundle"),
    AuditEvent.MODEL_UPDATE: EventMapping(SECURITY_ALERT, SOFTWARE_CONFIGURATION, "E", "bundle"),
    AuditEvent.PROVISIONING: EventMapping(SECURITY_ALERT, SECURITY_CONFIGURATION, "E", "other"),
    AuditEvent.SELFTEST: EventMapping(APPLICATION_ACTIVITY, None, "E", "other"),
    AuditEvent.APPLIANCE_STARTED: EventMapping(APPLICATION_ACTIVITY, APPLICATION_START, "E", "other"),
    AuditEvent.APPLIANCE_STOPPED: EventMapping(APPLICATION_ACTIVITY, APPLICATION_STOP, "E", "other"),
}

# A DICOM UID: dot-separated numbers, no leading zeros, at most 64 characters (PS3.5 9.1).
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+\Z")
SYSTEM_ACTORS = frozenset({"system"})


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent, tag, {"csd-code": code.code, "codeSystemName": code.scheme, "originalText": code.meaning}
    )


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8", "backslashreplace")).decode("ascii")


def _subject_object(kind: str, subject: str) -> tuple[dict[str, str], Code]:
    """ParticipantObjectTypeCode/-Role attributes and the ID type code for the entry's subject."""
    if kind == "study":
        id_type = STUDY_INSTANCE_UID if (len(subject) <= 64 and _UID.match(subject)) else APPLIANCE_STUDY_ID
        return {"ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"}, id_type  # system, report
    if kind == "user":
        return {"ParticipantObjectTypeCode": "1", "ParticipantObjectTypeCodeRole": "11"}, USER_IDENTIFIER
    if kind == "bundle":
        return {"ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "4"}, MODEL_BUNDLE  # resource
    return {"ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "4"}, OTHER_SUBJECT


def to_dicom_audit_element(
    entry: AuditEntry,
    *,
    audit_source_id: str | None = None,
    enterprise_site_id: str | None = None,
    ae_title: str | None = None,
) -> ET.Element:
    """The ``<AuditMessage>`` element for ``entry`` (see :func:`to_dicom_audit_message`)."""
    try:
        mapping = EVENT_MAPPING[AuditEvent(entry.event)]
    except ValueError as exc:
        raise ValueError(f"audit entry {entry.seq} has an unknown event {entry.event!r}") from exc
    source_id = audit_source_id or socket.gethostname()
    msg = ET.Element("AuditMessage")

    ev = ET.SubElement(
        msg,
        "EventIdentification",
        {
            "EventActionCode": mapping.action,
            "EventDateTime": entry.time,
            "EventOutcomeIndicator": "4" if entry.outcome == FAILURE else "0",
        },
    )
    _coded(ev, "EventID", mapping.event_id)
    if mapping.type_code is not None:
        _coded(ev, "EventTypeCode", mapping.type_code)
    _coded(ev, "EventTypeCode", Code(entry.event, PRIVATE, entry.event.replace("_", " ")))
    if entry.outcome == FAILURE:
        reason = entry.detail.get("error") or entry.detail.get("reason") or "failure"
        ET.SubElement(ev, "EventOutcomeDescription").text = str(reason)

    system = entry.actor in SYSTEM_ACTORS
    transfer = mapping.event_id == INSTANCES_TRANSFERRED
    requestor = ET.SubElement(
        msg, "ActiveParticipant", {"UserID": source_id if system else entry.actor, "UserIsRequestor": "true"}
    )
    if entry.source_ip:
        requestor.set("NetworkAccessPointID", entry.source_ip)
        requestor.set("NetworkAccessPointTypeCode", "2")  # IP address
    # The appliance's own process: the requestor itself for "system" events, else a second participant.
    app = (
        requestor
        if system
        else ET.SubElement(msg, "ActiveParticipant", {"UserID": source_id, "UserIsRequestor": "false"})
    )
    if ae_title:
        app.set("AlternativeUserID", f"AETITLE={ae_title}")
    _coded(app, "RoleIDCode", ROLE_APPLICATION)
    if transfer:  # A.5.3.7: the process that sent the data has the Source role
        _coded(app, "RoleIDCode", ROLE_SOURCE)
    destination = entry.detail.get("destination")
    if transfer and destination:
        dest = ET.SubElement(msg, "ActiveParticipant", {"UserID": str(destination), "UserIsRequestor": "false"})
        _coded(dest, "RoleIDCode", ROLE_DESTINATION)

    src = ET.SubElement(msg, "AuditSourceIdentification", {"AuditSourceID": source_id})
    if enterprise_site_id:
        src.set("AuditEnterpriseSiteID", enterprise_site_id)
    _coded(src, "AuditSourceTypeCode", SOURCE_APPLICATION_SERVER)

    if entry.subject:
        attrs, id_type = _subject_object(mapping.subject_kind, entry.subject)
        obj = ET.SubElement(msg, "ParticipantObjectIdentification", {"ParticipantObjectID": entry.subject, **attrs})
        _coded(obj, "ParticipantObjectIDTypeCode", id_type)
    rec = ET.SubElement(
        msg,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": f"{source_id}/audit/{entry.seq}",
            "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "4",
        },
    )
    _coded(rec, "ParticipantObjectIDTypeCode", AUDIT_ENTRY)
    detail_json = json.dumps(entry.detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for key, value in (("seq", str(entry.seq)), ("hash", entry.hash), ("detail", detail_json)):
        ET.SubElement(rec, "ParticipantObjectDetail", {"type": key, "value": _b64(value)})
    return _xml_safe(msg)


# Characters XML 1.0 does not allow (section 2.2, production [2] Char): C0 controls other than tab, LF and CR,
# surrogates, U+FFFE and U+FFFF. A message holding one is not well-formed, and an audit repository drops it.
_NOT_XML_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_char_escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _xml_safe(elem: ET.Element) -> ET.Element:
    """Every attribute value and text under ``elem`` with the characters XML 1.0 forbids written as ``\\xNN``
    / ``\\uNNNN`` (values recorded from outside, e.g. a direct method's bundle id, can hold any)."""
    for node in elem.iter():
        for key, value in node.attrib.items():
            node.attrib[key] = _NOT_XML_CHAR.sub(_xml_char_escape, value)
        if node.text:
            node.text = _NOT_XML_CHAR.sub(_xml_char_escape, node.text)
    return elem


def to_dicom_audit_message(
    entry: AuditEntry,
    *,
    audit_source_id: str | None = None,
    enterprise_site_id: str | None = None,
    ae_title: str | None = None,
) -> str:
    """Render one trail entry as a DICOM Audit Message (PS3.15 A.5.1), a complete UTF-8 XML document as
    ``str`` (with its XML declaration).

    ``audit_source_id``: AuditSourceID and the application participant's UserID (default: the host
    name); ``enterprise_site_id``: AuditEnterpriseSiteID (omitted if None); ``ae_title``: the appliance's
    AE title, given as ``AlternativeUserID="AETITLE=..."``. Characters XML 1.0 forbids (C0 controls but
    tab/LF/CR, U+FFFE, U+FFFF) are written as ``\\xNN``/``\\uNNNN``, so the document is always well-formed.
    Raises :class:`ValueError` for an entry whose event is not in :class:`~appliance.core.audit.AuditEvent`.
    """
    elem = to_dicom_audit_element(
        entry, audit_source_id=audit_source_id, enterprise_site_id=enterprise_site_id, ae_title=ae_title
    )
    return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(elem, encoding="unicode")
