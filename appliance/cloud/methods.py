"""Direct methods: ``$iothub/methods/POST/{name}/?$rid=`` -> handler -> ``$iothub/methods/res/{status}/?$rid=``.

Handlers are pluggable (name -> callable taking the parsed JSON payload and returning (status, JSON-able)),
so the appliance wires in its own self-test, resend and rollback. Bad payloads get 400, unknown methods
404, handler failures 500, and a method this build cannot do 501; the client keeps running in every case.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from appliance.core.logs import get_logger

log = get_logger(__name__)

MethodHandler = Callable[[Any], tuple[int, Any]]
MAX_PAYLOAD = 128 * 1024
HOOKED_METHODS = ("run_selftest", "resend", "rollback_model", "send_stats")


def not_available(name: str) -> MethodHandler:
    def handler(payload: Any) -> tuple[int, Any]:
        return 501, {"error": f"method {name!r} is not available on this build", "method": name}

    return handler


def parse_request(topic: str) -> tuple[str, str] | None:
    """(method name, request id) from a method request topic, or None if it is not one."""
    prefix = "$iothub/methods/POST/"
    if not topic.startswith(prefix):
        return None
    name, _, query = topic[len(prefix) :].partition("/?")
    rid = next((p[5:] for p in query.split("&") if p.startswith("$rid=")), None)
    return (name, rid) if name and rid else None


def response_topic(status: int, rid: str) -> str:
    return f"$iothub/methods/res/{status}/?$rid={rid}"


class MethodDispatcher:
    def __init__(self, handlers: dict[str, MethodHandler]):
        self.handlers = dict(handlers)

    def dispatch(self, name: str, raw: bytes) -> tuple[int, bytes]:
        """Run one method; always returns (status, JSON body), never raises."""
        started = time.monotonic()
        status, body = self._call(name, raw)
        try:
            out = json.dumps(body).encode()
        except (TypeError, ValueError) as exc:
            status, out = 500, json.dumps({"error": f"method result is not JSON-serialisable: {exc}"}).encode()
        if len(out) > MAX_PAYLOAD:
            status, out = 500, json.dumps({"error": "method result over 128 KB"}).encode()
        log.info("direct method", method=name, status=status, ms=round((time.monotonic() - started) * 1000, 1))
        return status, out

    def _call(self, name: str, raw: bytes) -> tuple[int, Any]:
        handler = self.handlers.get(name)
        if handler is None:
            log.warning("unknown direct method", method=name)
            return 404, {"error": f"unknown method {name!r}", "methods": sorted(self.handlers)}
        if len(raw) > MAX_PAYLOAD:
            return 413, {"error": f"payload of {len(raw)} bytes is over the 128 KB limit"}
        try:
            payload = json.loads(raw) if raw.strip() else None
        except RecursionError:  # nested so deep the parser runs out of stack: an answer, not a lost exception
            log.warning("direct method payload rejected", method=name, reason="nested too deep")
            return 400, {"error": "payload is nested too deep"}
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("direct method payload rejected", method=name, reason=str(exc))
            return 400, {"error": f"payload is not JSON: {exc}"}
        try:
            status, body = handler(payload)
        except (ValueError, TypeError, KeyError) as exc:
            return 400, {"error": f"bad request: {exc}"}
        except Exception as exc:  # a handler bug must not take the agent down
            log.exception("direct method failed", method=name)
            return 500, {"error": f"{type(exc).__name__}: {exc}"}
        if not isinstance(status, int) or not 200 <= status <= 599:
            return 500, {"error": f"handler returned an invalid status {status!r}"}
        return status, body
