"""Structured logging: every line says what happened to which study/bundle/message.

Use ``log = get_logger(__name__)`` then ``log.info("instance stored", study_uid=..., sop_uid=...)``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, TextIO

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
    return json.dumps(s) if (not s or any(c in s for c in ' ="')) else s


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields: Mapping[str, Any] = getattr(record, "fields", {}) or {}
        kv = " ".join(f"{k}={_fmt_value(v)}" for k, v in fields.items())
        line = f"{ts} {record.levelname:<7} {record.name}: {record.getMessage()}" + (f" {kv}" if kv else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **{
                k: (v if isinstance(v, (int, float, bool, type(None))) else str(v))
                for k, v in (getattr(record, "fields", {}) or {}).items()
            },
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send logs to stdout (journald picks them up under systemd), or ``stream`` (CLI output on stdout)."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom is chatty at INFO (one line per PDU); keep its warnings.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))
