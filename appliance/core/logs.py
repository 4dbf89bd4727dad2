"""Structured logging: every line says what happened to which study/bundle/message.

Use ``log = get_logger(__name__)`` then ``log.info("instance stored", study_id=..., sop_uid=...)``.

The formatters are the one place that keeps two promises for every record, whoever logged it:

- **No PHI at any level** (journald keeps lines past retention; DEBUG can be switched on remotely): fields
  that name a patient or a study
  (:data:`PHI_FIELDS`, and any field ending in ``_uid``, ``_uids`` or ``_name``) are replaced by a *log pseudonym*
  (``phi~`` + 10 hex of HMAC-SHA256 under a key drawn per process at :func:`configure`, so lines of one run
  can be correlated and nothing links them to the real value afterwards); UID-shaped text (five or more dotted
  numeric components, or a UUID-derived ``2.25.<integer>``; also inside a file name such as ``sc-<uid>.dcm``) in
  the message, any other field or a traceback is pseudonymised the same way, except the DICOM standard's own
  UIDs (``1.2.840.10008.*``: SOP classes, transfer syntaxes). DEBUG records are pseudonymised exactly like
  INFO, whether DEBUG comes from the box's own ``log.level`` or the twin's ``log_level``: a line at any level
  correlates by pseudonym, never by a real identifier (issue 19).
- **No forged lines**: control characters (C0, DEL, C1, and the Unicode line and paragraph separators) in the
  message and in every field are escaped (a newline is written as backslash-n, ESC as backslash-x1b), so a value
  from the network (an AE title, a patient name, an error text) can never start a new line or drive a terminal;
  each line of a traceback begins with ``| ``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, TextIO

# Field names whose values identify a patient or a study; ``*_uid`` / ``*_uids`` fields are treated alike.
PHI_FIELDS = frozenset(
    {"patient_name", "patient_id", "patient", "accession", "accession_number", "birth_date", "name", "uid"}
)
# A UID inside any text: five or more dotted numbers, or a UUID-derived UID (``2.25.<integer>``, PS3.5 B.2: only
# three components); not part of a longer number (a digit or a digit-dot before it, a digit or dot-digit after),
# but it may touch letters and punctuation (``sc-<uid>.dcm``, ``series_<uid>``). The standard's own UIDs stay.
_UID_TEXT = re.compile(r"(?<!\d)(?<!\d\.)(?!1\.2\.840\.10008\.)(?:2\.25\.[0-9]{6,}|[0-9]+(?:\.[0-9]+){4,})(?!\.?\d)")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_KEY = os.urandom(32)  # replaced at configure(); the log pseudonyms of one process


def _pseudonym(value: str) -> str:
    return "phi~" + hmac.new(_KEY, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:10]


def _escape(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        c = m.group(0)
        named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c)
        if named:
            return named
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"

    return _CONTROL.sub(one, text)


def _is_phi_field(key: str) -> bool:
    k = key.lower()
    return k in PHI_FIELDS or k.endswith(("_uid", "_uids", "_name"))


def clean_text(text: str, redact: bool) -> str:
    """``text`` as it may be written: UID-shaped parts pseudonymised when ``redact``, control characters escaped."""
    if redact:
        text = _UID_TEXT.sub(lambda m: _pseudonym(m.group(0)), text)
    return _escape(text)


def clean_fields(fields: Mapping[str, Any], redact: bool) -> dict[str, Any]:
    """Structured fields as they may be written (numbers, booleans and None unchanged; see the module doc)."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if isinstance(v, (int, float, bool, type(None))):
            out[k] = v
        elif redact and _is_phi_field(k):
            out[k] = _pseudonym(str(v))
        else:
            out[k] = clean_text(str(v), redact)
    return out


_RESERVED = {"exc_info", "stack_info", "stacklevel", "extra"}


class StructuredLogger(logging.LoggerAdapter[logging.Logger]):
    """Adapter that turns keyword arguments into structured fields."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k not in _RESERVED}
        extra = dict(kwargs.get("extra") or {})
        extra["fields"] = {**extra.get("fields", {}), **fields}
        kwargs["extra"] = extra
        return msg, kwargs

    if TYPE_CHECKING:  # what callers may pass: any keyword is a structured field (the stdlib stubs say otherwise)

        def debug(self, msg: object, *args: object, **fields: Any) -> None: ...

        def info(self, msg: object, *args: object, **fields: Any) -> None: ...

        def warning(self, msg: object, *args: object, **fields: Any) -> None: ...

        def error(self, msg: object, *args: object, **fields: Any) -> None: ...

        def exception(self, msg: object, *args: object, **fields: Any) -> None: ...


def get_logger(name: str) -> StructuredLogger:
    return StructuredLogger(logging.getLogger(name), {})


def _fmt_value(v: Any) -> str:
    s = str(v)
    return json.dumps(s) if (not s or any(c in s for c in ' ="\\')) else s


def _parts(formatter: logging.Formatter, record: logging.LogRecord) -> tuple[str, dict[str, Any], str | None]:
    """(message, fields, traceback) of a record, cleaned: PHI pseudonymised at every level, controls escaped."""
    redact = True
    msg = clean_text(record.getMessage(), redact)
    fields = clean_fields(getattr(record, "fields", {}) or {}, redact)
    exc = None
    if record.exc_info:
        exc = formatter.formatException(record.exc_info)
        # a traceback keeps its lines, each marked "| ": an exception text can never start a line of its own
        exc = "\n".join("| " + clean_text(line, redact) for line in exc.split("\n"))
    return msg, fields, exc


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        msg, fields, exc = _parts(self, record)
        kv = " ".join(f"{k}={_fmt_value(v)}" for k, v in fields.items())
        line = f"{ts} {record.levelname:<7} {record.name}: {msg}" + (f" {kv}" if kv else "")
        if exc:
            line += "\n" + exc
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg, fields, exc = _parts(self, record)
        doc: dict[str, Any] = {"ts": record.created, "level": record.levelname, "logger": record.name, "msg": msg}
        doc.update(fields)
        if exc:
            doc["exc"] = exc
        return json.dumps(doc)


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send logs to stdout (journald picks them up under systemd), or ``stream`` (CLI output on stdout). Draws
    the key of this process's log pseudonyms (every level is pseudonymised, DEBUG included)."""
    global _KEY
    _KEY = os.urandom(32)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom is chatty at INFO (one line per PDU); keep its warnings.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))
